"""Non-finite values on the single-process path (issue 24 point 10, for test-time training): a local
step whose gradient norm is not finite stops in one line with the step not applied; ``refine-ray
eval`` refuses a model whose weights hold a NaN before it evaluates anything."""
import pytest
import torch

from refine_ray import cli
from refine_ray.config import RefineConfig
from refine_ray.models import registry
from refine_ray.refine.local_step import LocalRefineStep

REFINE = dict(n_chunks=2, response_length=3, samples_per_prefix=2, min_prefix=8)


def _docs(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (64,), generator=g) for _ in range(2)]


@pytest.mark.parametrize("mode", ["refine", "ntp"])
def test_non_finite_local_step_is_one_line_and_not_applied(tokenizer, mode):
    model = registry.build_model("delta_net", seed=0, vocab_size=len(tokenizer))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step = LocalRefineStep(model, opt, RefineConfig(**REFINE, reward="exact"))
    step.step(_docs(len(tokenizer)), mode)                   # one good step: the optimizer has state
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {id(p): s["exp_avg"].clone() for p, s in opt.state.items()}
    with torch.no_grad():   # a NaN reaches the loss only in training, after the cuts (the LM head)
        model.lm_head.weight[0, 0] = float("nan")
    before["lm_head.weight"] = model.lm_head.weight.detach().clone()
    with pytest.raises(FloatingPointError) as e:
        step.step(_docs(len(tokenizer)), mode)
    msg = str(e.value)
    expected = ("is nan on document", "the optimizer step was not applied") if mode == "ntp" else \
        ("next-token entropy is not finite", "nothing was sampled or applied")   # refine: found at scoring
    assert "\n" not in msg and all(e in msg for e in expected), msg
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v) or (torch.isnan(v).any() and torch.equal(after[k].nan_to_num(), v.nan_to_num())), k
    assert all(torch.equal(opt.state[p]["exp_avg"], moments[id(p)]) for p in opt.state)


def test_eval_refuses_nan_weights_in_one_line(tokenizer, tmp_path, shared_data, capsys):
    model = registry.build_model("delta_net", seed=0, vocab_size=len(tokenizer))
    with torch.no_grad():
        model.model.layers[0].attn.q_proj.weight[1, 2] = float("nan")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "r.json"
    capsys.readouterr()                                  # save_pretrained's progress bar
    code = cli.main(["eval", "--config", "configs/ttt_tiny_longbench.yaml", "--model", str(tmp_path / "model"),
                     "--data", str(shared_data / "longbench" / "trec_16384.parquet"), "--limit", "1",
                     "--ttt", "refine", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "tensor 'model.layers.0.attn.q_proj.weight' holds 1 non-finite value" in err[0], err
    assert not out.exists()
