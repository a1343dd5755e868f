"""ZeRO-3 with ranks whose data differ: every rank must issue the same module calls.

Under ZeRO-3 each call of a partitioned module gathers its weights with a collective, so a
rank that calls the LM head once more than the other (a longer document, one more
validation document, a longer answer) blocks or mismatches the group. Real components: a
local Ray cluster, two DeepSpeed ranks over gloo, the offline MiniLM tokenizer, a tiny
random DeltaNet, parquet files written here.
"""
import numpy as np
import pandas as pd
import pytest

from refine_ray.transport.batches import DocBatch
from refine_ray.config import load_config
from refine_ray.data import Corpus, load_tokenizer
from refine_ray.system.controller import LearnerFailure, RefineController


def _text(tokenizer, n_tokens: int, seed: int) -> str:
    """A text of exactly ``n_tokens`` WordPiece tokens: random whole words of one token each."""
    vocab = sorted(w for w in tokenizer.vocab if w.isascii() and w.isalpha() and len(w) > 3)
    words = np.random.default_rng(seed).choice(vocab, n_tokens).tolist()
    text = " ".join(words)
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == n_tokens
    return text


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tok = load_tokenizer()
    root = tmp_path_factory.mktemp("zero3")
    # Training: the NTP loss calls the head once per 1024 positions -> 2 calls vs 1.
    # Answers of 1 and 5 tokens: the task SFT loss must not branch on the answer's length.
    train = pd.DataFrame({"prompt": [_text(tok, 1100, 0), _text(tok, 505, 1)],
                          "answer": [["paris"], ["the answer is forty two"]]})
    # Validation: 3 documents over 2 ranks (2 vs 1), also of uneven lengths.
    val = pd.DataFrame({"prompt": [_text(tok, n, 10 + n) for n in (1100, 300, 40)], "answer": [["x"]] * 3})
    train.to_parquet(root / "train.parquet")
    val.to_parquet(root / "val.parquet")
    return root


@pytest.fixture(scope="module")
def controller(cluster, data, tmp_path_factory):
    """ZeRO-3 over 2 ranks, post-training (REFINE then task SFT), validation of 3 documents."""
    cfg = load_config("configs/tiny_deltanet_mid.yaml", [
        f"data.path={data / 'train.parquet'}", "data.answer_column=answer", "data.max_length=1200",
        "data.shuffle=false", "refine.n_chunks=2", "learner.zero_stage=3", "learner.num_ranks=2",
        "train.task_update=sft", f"train.val_path={data / 'val.parquet'}", "train.val_every=1",
        "train.val_docs=3", "optim.warmup_steps=4", "learner.collective_timeout_s=15",
        f"train.output_dir={tmp_path_factory.mktemp('out')}"])
    controller = RefineController(cfg, len(load_tokenizer()))
    ranks = list(controller.learners.actors)
    yield controller
    controller.learners.actors = ranks
    controller.shutdown()


def test_zero3_ranks_with_uneven_documents_answers_and_validation(controller):
    cfg = controller.cfg
    corpus = Corpus(cfg.data, load_tokenizer())
    assert [len(corpus.document(i).ids) for i in range(2)] == [1100, 505]
    assert [len(corpus.document(i).answer_ids) for i in range(2)] == [1, 5]
    metrics = controller.step()
    assert sorted(controller.last_experience.scored.docs.doc_ids.tolist()) == [0, 1]
    for name in ("loss", "ntp_loss", "pg_loss", "task_sft_loss", "val/ntp_loss"):
        assert np.isfinite(metrics[name]) and metrics[name] > 0, name
    # a random tiny model is near log(vocab) = 10.3 on held-out text
    assert 8.0 < metrics["val/ntp_loss"] < 12.0
    # the rate step 0 used: a quarter of the peak in a 4-step warm-up
    assert metrics["lr"] == pytest.approx(cfg.optim.lr / 4)


def test_zero3_collective_mismatch_is_one_line_error(controller):
    """A rank left out of a collective: the other times out with one line, never hangs.
    (Runs last: it leaves the learner group broken.)"""
    controller.learners.actors = controller.learners.actors[:1]     # rank 1 never joins rank 0's gathers
    docs = DocBatch.from_lists([0], [np.arange(1, 40)])
    with pytest.raises(LearnerFailure) as err:
        controller.learners.call_all("validation_nll", docs)
    message = str(err.value)
    assert "\n" not in message and "rank 0 failed during 'validation_nll'" in message
    assert "learner.collective_timeout_s=15 s" in message
