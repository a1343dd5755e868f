"""``refine-ray eval``: greedy answers (optionally after test-time training) and scores.

    refine-ray eval --model PATH_OR_tiny:delta_net --data ../shared/data/longbench/trec_16384.parquet \\
        [--data MORE.parquet] [--niah multikey:4096:20] [--limit N] [--ttt none|ntp|refine] \\
        [--out results/run.json] [--name RUN] [--config configs/ttt_tiny_longbench.yaml] [eval.x=y key=value ...]

Inputs: LongBench files (``{task}_{len}.parquet``; per-task metric from
``refine_ray.eval.metrics``), RULER QA files (``ruler_{task}_{model}_{len}_{n}_{split}.parquet``;
first-line substring hit) and generated NIAH rows (``refine_ray.eval.niah``; recall).
Output: ``{"run_name": RUN, "<task>": score, ..., "meta": {...}}`` (scores 0-100; RULER and
NIAH keys are ``<task>_<length>``), the format ``refine_ray.eval.tables`` reads, plus the
per-row predictions in ``<out>.predictions.jsonl``.

Decisions vs the reference:
  * Generation budget per LongBench task: each row's ``max_gen_tokens`` (LongBench's
    per-task lengths; the reference cuts every task to 32 tokens), optionally capped by
    ``eval.max_gen_tokens`` (set 32 to reproduce the reference). RULER QA uses
    ``eval.ruler_gen_tokens`` (32 = the reference), NIAH ``eval.niah_gen_tokens``.
  * Prompts longer than ``eval.max_prompt_tokens`` are truncated from the MIDDLE (first
    half + last half of the token budget, LongBench's convention, so the question at the
    end survives); the reference right-truncates. Prompts are tokenised without special
    tokens (as the reference), and TTT adapts on the same truncated tokens.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from refine_ray.config import ConfigError, EvalConfig, ExperimentConfig, ModelConfig, from_dict, validate_config
from refine_ray.data import truncate
from refine_ray.eval import metrics as M
from refine_ray.eval.data import load_longbench, load_ruler, ruler_file_info
from refine_ray.eval.niah import ESSAY_HAYSTACK, VARIANTS, generate_niah, score_niah
from refine_ray.ttt import TestTimeTrainer

__all__ = ["EvalConfig", "EvalError", "EvalSet", "load_eval_sets", "build_eval_model",
           "run_eval", "write_json_atomic"]


class EvalError(ValueError):
    """Bad evaluation input; the message is one line naming the file or option."""


@dataclass
class EvalSet:
    key: str                   # result key: LongBench task, or <task>_<length>
    kind: str                  # 'longbench' | 'ruler' | 'niah'
    rows: list[dict[str, Any]]
    source: str
    all_rows: list[dict[str, Any]] = field(default_factory=list)  # whole file (trec classes)


def load_eval_sets(paths: Sequence[str], niah: Sequence[str], tokenizer, limit: Optional[int]) -> list[EvalSet]:
    sets: list[EvalSet] = []
    for p in paths:
        name = Path(p).name
        if name.startswith("ruler_"):
            info = ruler_file_info(p)
            rows = load_ruler(p)
            sets.append(EvalSet(f"{info['task']}_{info['length']}", "ruler", rows[:limit], str(p), rows))
            continue
        rows = load_longbench(p)
        tasks = sorted({str(r["task"]) for r in rows})
        unknown = [t for t in tasks if t not in M.TASK_METRIC]
        if unknown:
            raise EvalError(f"{name}: unknown LongBench task '{unknown[0]}' (known: {', '.join(M.LONGBENCH_TASKS)})")
        for task in tasks:
            task_rows = [r for r in rows if r["task"] == task]
            sets.append(EvalSet(task, "longbench", task_rows[:limit], str(p), task_rows))
    for spec in niah:
        parts = spec.split(":")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            raise EvalError(f"--niah {spec!r}: expected VARIANT:LENGTH:N, e.g. multikey:4096:20")
        try:
            rows = generate_niah(parts[0], ESSAY_HAYSTACK, _NoSpecial(tokenizer), int(parts[1]), int(parts[2]))
        except ValueError as e:
            raise EvalError(f"--niah {spec!r}: {e} (variants: {', '.join(VARIANTS)})") from None
        sets.append(EvalSet(f"{rows[0]['task']}_{parts[1]}", "niah", rows[:limit], f"niah:{spec}", rows))
    keys = [s.key for s in sets]
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
        raise EvalError(f"two inputs give the same result key {sorted(dup)[0]!r}")
    if not sets:
        raise EvalError("nothing to evaluate: give --data FILE and/or --niah VARIANT:LENGTH:N")
    return sets


class _NoSpecial:
    """NIAH fits prompts with ``encode``; count tokens as evaluation tokenises them."""

    def __init__(self, tok):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]


def gen_budget(s: EvalSet, row: dict, cfg: EvalConfig) -> int:
    if s.kind == "longbench":
        n = M.max_gen_tokens(row)
        return min(n, cfg.max_gen_tokens) if cfg.max_gen_tokens else n
    return cfg.ruler_gen_tokens if s.kind == "ruler" else cfg.niah_gen_tokens


def score_set(s: EvalSet, preds: list[str]) -> float:
    answers = [r["answers"] for r in s.rows]
    if s.kind == "longbench":
        classes = M.trec_classes(s.all_rows) if s.key == "trec" else None
        return M.score_longbench(s.key, preds, answers, classes)
    if s.kind == "ruler":
        return round(M.score_ruler_qa(preds, answers), 2)
    return round(score_niah(preds, answers), 2)


def build_eval_model(spec: str, cfg: ExperimentConfig, tokenizer_path: Optional[str] = None):
    """``tiny:TYPE`` (random model shaped by ``cfg.model``) or a local HF dir; returns (model, tokenizer)."""
    from refine_ray.data import load_tokenizer
    from refine_ray.policy import build_policy

    if spec.startswith("tiny:"):
        m = cfg.model
        raw = dict(type=spec.split(":", 1)[1], hidden_size=m.hidden_size, num_hidden_layers=m.num_hidden_layers,
                   num_heads=m.num_heads, seed=m.seed, dtype="float32")
        try:
            mcfg = from_dict(ModelConfig, raw, "model")
            validate_config(mcfg, "model")
        except ConfigError as e:
            raise EvalError(f"--model {spec!r}: {e}") from None
        tok = load_tokenizer(tokenizer_path or cfg.tokenizer.path)
    else:
        if not Path(spec, "config.json").is_file():
            raise EvalError(f"--model {spec!r}: not a local HF model directory (no config.json) nor tiny:TYPE")
        mcfg = ModelConfig(path=spec, dtype="float32")   # fp32 weights; bf16 only as autocast
        has_tok = any(Path(spec, f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        tok = load_tokenizer(tokenizer_path or cfg.tokenizer.path or (spec if has_tok else None))
    tok.model_max_length = 1 << 30   # prompts are truncated by eval.max_prompt_tokens, not here
    try:
        model = build_policy(mcfg, len(tok))
    except (ValueError, ImportError) as e:
        raise EvalError(f"--model {spec!r}: {str(e).splitlines()[0]}") from None
    return model, tok


def _eos_ids(model, tok) -> Optional[list[int]]:
    ids = {i for i in (getattr(model.config, "eos_token_id", None), tok.eos_token_id) if isinstance(i, int)}
    return sorted(ids) or None


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_eval(model, tokenizer, cfg: ExperimentConfig, ecfg: EvalConfig, sets: list[EvalSet], name: str,
             out: Optional[Path] = None, show_progress: bool = True) -> dict[str, Any]:
    """Answer and score every set; returns (and writes to ``out``) the result dict."""
    from tqdm import tqdm

    t0 = time.time()
    trainer = TestTimeTrainer(model, cfg, ecfg.ttt, tokenizer)
    eos = _eos_ids(model, tokenizer)
    result: dict[str, Any] = {"run_name": name}
    records, per_set = [], {}
    total = sum(len(s.rows) for s in sets)
    with tqdm(total=total, desc=f"eval {name}", unit="row", disable=not show_progress) as bar:
        for s in sets:
            prompts, budgets, truncated = [], [], 0
            for row in s.rows:
                ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
                truncated += len(ids) > ecfg.max_prompt_tokens
                prompts.append(torch.tensor(truncate(list(ids), ecfg.max_prompt_tokens, "middle"), dtype=torch.long))
                budgets.append(gen_budget(s, row, ecfg))
            bar.set_postfix(task=s.key)
            outs = trainer.answer(prompts, budgets, eos_token_id=eos, progress=bar)
            preds = [tokenizer.decode(o.tolist(), skip_special_tokens=True) for o in outs]
            result[s.key] = score_set(s, preds)
            per_set[s.key] = {"rows": len(s.rows), "source": s.source, "truncated_prompts": truncated}
            for i, (row, pred) in enumerate(zip(s.rows, preds)):
                records.append({"set": s.key, "row": i, "prediction": pred, "answers": list(row["answers"])})
    result["meta"] = {"model": getattr(model.config, "model_type", "?"), "ttt": asdict(ecfg.ttt),
                      "eval": {k: v for k, v in asdict(ecfg).items() if k != "ttt"},
                      "sets": per_set, "ttt_metrics": trainer.summary(), "seconds": round(time.time() - t0, 2)}
    if out is not None:
        write_json_atomic(out, result)
        pred_path = out.with_name(out.stem + ".predictions.jsonl")
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{pred_path.name}.tmp-")
        with os.fdopen(fd, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(tmp, pred_path)
    return result


def summary_line(result: dict[str, Any], out: Optional[Path]) -> str:
    scores = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    meta = result["meta"]
    parts = [f"{k}={v:.2f}" for k, v in scores.items()]
    avg = sum(scores.values()) / len(scores)
    tm = meta["ttt_metrics"]
    ttt = meta["ttt"]["mode"]
    if ttt != "none":
        ttt += (f" x{meta['ttt']['steps']} {'accumulate' if meta['ttt']['accumulate'] else 'reset'}"
                f" fallback={int(tm.get('ttt/ntp_fallback_prompts', 0))}")
    rows = sum(s["rows"] for s in meta["sets"].values())
    where = f" -> {out}" if out else ""
    return (f"{result['run_name']}: {' '.join(parts)} (avg {avg:.2f}; {rows} rows; ttt {ttt}; "
            f"{meta['seconds']:.1f}s){where}")
