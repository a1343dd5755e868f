"""The REFINE vs NTP recall experiment (scripts/recall_experiment.py, issue 15 point 5).

Fast: the task's layout (every token after the separator is determined by the key-value
block), its seeding, and that REFINE's cuts land on the queries. Slow: the whole one-command
pipeline on a very small case writes its JSON, table and plot, with the equal-CPU-time rows.
"""
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from refine_ray.refine.scoring import score_document

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def experiment():
    # imported by name from scripts/ on sys.path: the spawned seed processes inherit the path and
    # unpickle run_seed by module name
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        yield importlib.import_module("recall_experiment")
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def test_layout_replays_the_pairs_after_the_separator(experiment):
    import numpy as np

    ids, answers = experiment.recall_document(np.random.default_rng(0), pairs=5, value_len=3, filler=7)
    block = 5 * 4
    assert ids.shape == answers.shape == (2 * block + 7 + 1,)
    assert int(ids[block + 7]) == experiment.SEP and torch.equal(ids[:block], ids[-block:])
    # the answers are the replayed values: not the replayed keys, nothing before the separator
    assert torch.equal(answers[-block:].view(5, 4), torch.tensor([[False, True, True, True]] * 5))
    assert not answers[:-block].any()
    keys = ids[:block].view(5, 4)[:, 0]
    assert len(set(keys.tolist())) == 5 and bool(((keys >= 0) & (keys < 64)).all())
    values = ids[:block].view(5, 4)[:, 1:]
    assert bool(((values >= 64) & (values < 192)).all())
    filler = ids[block:block + 7]
    assert bool(((filler >= 192) & (filler < 255)).all())
    with pytest.raises(ValueError, match="pairs=65"):
        experiment.recall_document(np.random.default_rng(0), pairs=65, value_len=1, filler=1)


def test_documents_are_keyed_by_seed_stream_and_index(experiment):
    a = experiment.documents(0, 1, 5, 3, 4, 2, 8)[0]
    assert all(torch.equal(x, y) for x, y in zip(a, experiment.documents(0, 1, 5, 3, 4, 2, 8)[0]))
    for other in (experiment.documents(1, 1, 5, 3, 4, 2, 8)[0], experiment.documents(0, 2, 5, 3, 4, 2, 8)[0],
                  experiment.documents(0, 1, 6, 3, 4, 2, 8)[0]):
        assert not torch.equal(a[0], other[0])


def test_refine_cuts_land_on_the_queries(experiment):
    setup = experiment.Setup(pairs=6, value_len=2, filler=6, hidden=32)
    cfg = experiment.refine_config(setup, "refine_exact")
    ids, _ = experiment.documents(0, 1, 0, 1, 6, 2, 6)
    model = experiment.new_model(setup)
    first_replayed = ids[0].numel() - 6 * 3
    assert int(ids[0][first_replayed - 1]) == experiment.SEP
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        score = score_document(model, ids[0], cfg, generator=gen)
        # the prefix holds the separator: every continuation is replayed (determined) tokens
        assert int(score.cuts.min()) >= first_replayed


def test_recall_metrics_of_a_perfect_copier(experiment):
    """A model whose logits put the true next token on top scores recall 1."""
    docs, queries = experiment.documents(0, 2, 0, 2, 4, 2, 6)

    class Oracle(torch.nn.Module):
        def forward_segment(self, ids, state, return_logits=True):
            logits = torch.full((*ids.shape, 256), -10.0)
            logits[:, :-1].scatter_(-1, ids[:, 1:, None], 10.0)
            return type("Out", (), {"logits": logits})()

    metrics = experiment.recall_metrics(Oracle(), docs, queries, value_len=2)
    assert metrics["recall"] == metrics["query_recall"] == metrics["sequence_recall"] == 1.0
    assert metrics["query_ntp_loss"] < 1e-3


def test_a_finished_seed_of_another_setup_is_refused(experiment, tmp_path):
    from dataclasses import asdict

    saved = experiment.Setup(seed=0, continue_steps=150)
    (tmp_path / "seed_0.json").write_text(json.dumps({"setup": asdict(saved)}))
    experiment.check_finished([saved, experiment.Setup(seed=1)], tmp_path)     # same setup: reused
    with pytest.raises(ValueError, match=r"seed_0.json: written by another setup.*'continue_steps': \(150, 20\)"):
        experiment.main([experiment.Setup(seed=0, continue_steps=20)], tmp_path, jobs=1, command="test")
    assert not (tmp_path / "results.json").exists()
    (tmp_path / "seed_2.json").write_text("")
    with pytest.raises(ValueError, match=r"seed_2.json: not a finished seed's results"):
        experiment.check_finished([experiment.Setup(seed=2)], tmp_path)


def test_arms_start_from_the_same_optimizer_state(experiment):
    """Every arm continues from the pre-trained model AND optimizer state; running one must not
    change the start the next arm gets (AdamW updates loaded state tensors in place)."""
    setup = experiment.Setup(pairs=8, hidden=16, layers=1, batch=2, max_pretrain_steps=3, pretrain_check_every=3,
                             continue_steps=3, eval_every=5, heldout_docs=2, val_docs=1, eval_lengths=[(8, 0)])
    state, opt_state, _, steps = experiment.pretrain(setup, log=lambda msg: None)
    runs = [experiment.continue_arm(setup, "ntp", (state, opt_state, steps), log=lambda msg: None) for _ in range(2)]
    finals = [{k: v for k, v in run["final"].items() if k != "train_cpu_s"} for run in runs]
    assert finals[0] == finals[1] and finals[0]["step"] == 3      # 3: not a multiple of eval_every


@pytest.mark.slow
def test_one_command_writes_table_plot_and_equal_time_rows(experiment, tmp_path):
    setups = [experiment.Setup(seed=s, max_pretrain_steps=6, pretrain_check_every=3, continue_steps=4, eval_every=2, heldout_docs=4,
                               val_docs=2, batch=4, eval_lengths=[(16, 64), (16, 128)]) for s in (0, 1)]
    experiment.main(setups, tmp_path, jobs=2, command="test")
    for name in ("results.json", "results.md", "recall.png", "seed_0.json", "seed_1.json"):
        assert (tmp_path / name).stat().st_size > 0
    seeds = json.loads((tmp_path / "results.json").read_text())["seeds"]
    for run in seeds:
        arms = run["arms"]
        assert set(arms) == {"start", "refine_exact", "refine_cosine", "ntp"}
        for arm in ("refine_exact", "refine_cosine"):
            at = arms["ntp"]["at_time"][arm]
            assert at["train_cpu_s"] >= arms[arm]["final"]["train_cpu_s"]
            assert arms[arm]["final"]["step"] == 4 and "P16_F128/recall" in at
    table = (tmp_path / "results.md").read_text()
    assert "ntp (equal CPU time of refine_exact) (n=2)" in table and "refine_exact − ntp, equal steps" in table
