"""``refine-ray eval`` with ``eval.backend=vllm``: the same greedy answers as the native engine.

Runs only where vLLM is installed (``bash scripts/setup_vllm.sh``, then
``.venv-vllm/bin/python -m pytest tests/serving/test_vllm_eval.py``); elsewhere it skips with
that reason. Per model type one tiny random fp32 model (configs/ttt_tiny_longbench.yaml's
shape, the real tokenizer's vocabulary) answers real LongBench (trec, samsum: its newline stop
and min_new_tokens=1) and RULER rows, truncated to 96 prompt tokens, with both backends: the
answer token ids, the predictions and the scores must be equal. One engine per model type
(~1-2 min to start on a shared CPU).
"""
import json

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM not installed: bash scripts/setup_vllm.sh, then run with .venv-vllm")

from refine_ray.config import load_config  # noqa: E402
from refine_ray.eval.evaluate import (build_eval_model, gen_budget, load_eval_sets, run_eval, stop_ids,  # noqa: E402
                                      tokenize_sets)
from refine_ray.eval.ttt import TestTimeTrainer  # noqa: E402
from refine_ray.serving.vllm_generate import VLLMGreedy  # noqa: E402

FILES = ("longbench/trec_16384.parquet", "longbench/samsum_16384.parquet",
         "ruler/ruler_squadqa_delta_net_4096_200_test.parquet")
OVERRIDES = ["eval.max_prompt_tokens=96", "eval.max_gen_tokens=12", "eval.ruler_gen_tokens=12", "eval.limit=3"]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["gated_deltanet", "delta_net"])
def test_vllm_eval_answers_equal_native(model_type, shared_data, tmp_path):
    cfg = load_config("configs/ttt_tiny_longbench.yaml", OVERRIDES)
    model, tok = build_eval_model(f"tiny:{model_type}", cfg)
    model.eval()
    ecfg = cfg.eval
    sets = load_eval_sets([str(shared_data / f) for f in FILES], [], tok, ecfg.limit)
    prompts = tokenize_sets(sets, tok, ecfg)
    longest = max(len(t) for toks, _ in prompts for t in toks)
    engine = VLLMGreedy(model, longest + 12)
    try:
        native = TestTimeTrainer(model, cfg, ecfg.ttt, tok)
        n_tokens = 0
        for s, (toks, _) in zip(sets, prompts):
            budgets = [gen_budget(s, row, ecfg) for row in s.rows]
            stop, min_new = stop_ids(s, model, tok)
            ours = native.answer(toks, budgets, eos_token_id=stop, min_new_tokens=min_new)
            theirs = engine.answer(toks, budgets, eos_token_id=stop, min_new_tokens=min_new)
            assert [a.tolist() for a in theirs] == [a.tolist() for a in ours], s.key
            n_tokens += sum(len(a) for a in ours)
        assert n_tokens > 0
        # the whole eval command path: the same predictions and scores with either backend
        res = {}
        for backend in ("native", "vllm"):
            ecfg.backend = backend
            out = tmp_path / f"{backend}.json"
            res[backend] = run_eval(model, tok, cfg, ecfg, sets, backend, out, show_progress=False, engine=engine)
            res[backend + "_preds"] = [json.loads(line)["prediction"]
                                       for line in out.with_name(f"{backend}.predictions.jsonl").read_text().splitlines()]
        scores = {k: v for k, v in res["native"].items() if k not in ("run_name", "meta")}
        assert scores and scores == {k: v for k, v in res["vllm"].items() if k not in ("run_name", "meta")}
        assert res["native_preds"] == res["vllm_preds"] and len(res["vllm_preds"]) == 9
        assert res["vllm"]["meta"]["eval"]["backend"] == "vllm"
    finally:
        engine.close()
