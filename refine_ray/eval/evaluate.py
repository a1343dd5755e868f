"""``refine-ray eval``: greedy answers (optionally after test-time training) and scores.

    refine-ray eval --model PATH_OR_tiny:delta_net --data ../shared/data/longbench/trec_16384.parquet \\
        [--data MORE.parquet] [--niah niah_multikey_1:4096:20] [--limit N] [--ttt none|ntp|refine] \\
        [--out results/run.json] [--name RUN] [--config configs/ttt_tiny_longbench.yaml] [eval.x=y key=value ...]

Inputs: LongBench / LongBench-E files (``{task}_{len}.parquet``; per-task metric from
``refine_ray.eval.metrics`` under ``eval.longbench_rule``: LongBench's own or upstream
ReFINE's), RULER QA files (``ruler_{task}_{model}_{len}_{n}_{split}.parquet``; two metrics,
see below) and RULER's eight NIAH tasks generated as RULER does (``refine_ray.eval.niah``;
``string_match_all``). Output: ``{"run_name": RUN, "<task>": score, ..., "meta": {...}}`` (scores
0-100; ``meta.scorers`` names the family, metric and rule behind every key; RULER and
NIAH keys are ``<task>_<length>``; RULER QA adds ``<task>_string_match_part_<length>``; a
LongBench-E file with a ``length`` column adds ``<task>_e_by_length``, its 0-4k / 4-8k / 8k+
scores), the format ``refine_ray.eval.tables`` reads, plus ``<out>.predictions.jsonl`` (per
row: prediction, answers, 0-1 score), saved after every batch; a re-run with the same ``--out``
resumes (``refine_ray.eval.progress``). A prompt that tokenises to nothing is a one-line error
before any row is answered. See docs/evaluation.md.

Decisions vs upstream ReFINE:
  * Generation budget per LongBench task: each row's ``max_gen_tokens`` (LongBench's
    per-task lengths; upstream ReFINE cuts every task to 32 tokens), optionally capped by
    ``eval.max_gen_tokens`` (set 32 to reproduce upstream ReFINE). RULER QA uses
    ``eval.ruler_gen_tokens`` (32 = upstream ReFINE), NIAH ``eval.niah_gen_tokens``.
  * Prompts longer than ``eval.max_prompt_tokens`` are truncated from the MIDDLE (first
    half + last half of the token budget, LongBench's convention, so the question at the
    end survives); upstream ReFINE right-truncates. Prompts are tokenised without special
    tokens (as upstream ReFINE), and TTT adapts on the same truncated tokens.
  * RULER QA: ``<task>_<length>`` is upstream ReFINE's first-line rule (the paper's tables);
    ``<task>_string_match_part_<length>`` is RULER's official metric.
  * samsum stops at the newline token after at least one token, as LongBench's pred.py.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from refine_ray.config import ConfigError, EvalConfig, ExperimentConfig, ModelConfig, from_dict, validate_config
from refine_ray.data import truncate
from refine_ray.eval import metrics as M
from refine_ray.eval.data import load_longbench, load_ruler, ruler_file_info
from refine_ray.eval.niah import METRIC as NIAH_METRIC
from refine_ray.eval.niah import check_task as check_niah_task
from refine_ray.eval.niah import generate_niah, niah_recall, string_match_all
from refine_ray.eval.progress import PredictionLog, prompt_hash, write_atomic
from refine_ray.eval.ttt import TestTimeTrainer

__all__ = ["EvalConfig", "EvalError", "EvalSet", "load_eval_sets", "build_eval_model", "stop_ids",
           "tokenize_sets", "run_eval", "write_json_atomic", "scorer_of"]


VLLM_BATCH = 64   # rows per vLLM generate call with eval.backend=vllm (answers saved after each)


class EvalError(ValueError):
    """Bad evaluation input; the message is one line naming the file or option."""


@dataclass
class EvalSet:
    """One evaluation set: its result key, its kind and its rows (prompt, answers, budgets)."""
    key: str                   # result key: LongBench task, or <task>_<length>
    kind: str                  # 'longbench' | 'ruler' | 'niah'
    rows: list[dict[str, Any]]
    source: str
    all_rows: list[dict[str, Any]] = field(default_factory=list)  # whole file (trec classes)


def _niah_spec(spec: str) -> tuple[str, int, int]:
    parts = spec.split(":")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit() or int(parts[2]) == 0:
        raise EvalError(f"--niah {spec!r}: expected TASK:LENGTH:N, e.g. niah_multikey_1:4096:20")
    try:
        return check_niah_task(parts[0]), int(parts[1]), int(parts[2])
    except ValueError as e:
        raise EvalError(f"--niah {spec!r}: {e}") from None


def load_eval_sets(paths: Sequence[str], niah: Sequence[str], tokenizer, limit: Optional[int],
                   ecfg: Optional[EvalConfig] = None) -> list[EvalSet]:
    """Eval sets of the given files and ``--niah TASK:LENGTH:N`` specs (RULER's eight tasks, generated
    with ``ecfg``'s ``niah_seed``, ``niah_essays`` and ``niah_gen_tokens``, RULER's
    ``tokens_to_generate``; only the first ``limit`` rows are generated, the same rows as a full set's
    first ones). Every spec and every LongBench task is checked (``ecfg.longbench_rule`` included)
    before anything is generated. One-line EvalError/DataError."""
    ecfg = ecfg or EvalConfig()
    specs = [_niah_spec(spec) for spec in niah]
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
        for task in tasks:
            try:
                M.check_rule(task, ecfg.longbench_rule)
            except ValueError as e:
                raise EvalError(f"{name}: {e}") from None
        for task in tasks:
            task_rows = [r for r in rows if r["task"] == task]
            sets.append(EvalSet(task, "longbench", task_rows[:limit], str(p), task_rows))
    for spec, (task, length, n) in zip(niah, specs):
        try:
            rows = generate_niah(task, _NoSpecial(tokenizer), length, min(n, limit or n), seed=ecfg.niah_seed,
                                 tokens_to_generate=ecfg.niah_gen_tokens, essays=ecfg.niah_essays)
        except ValueError as e:
            raise EvalError(f"--niah {spec!r}: {e}") from None
        sets.append(EvalSet(f"{task}_{length}", "niah", rows, f"niah:{spec}", rows))
    keys = [s.key for s in sets]
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
        raise EvalError(f"two inputs give the same result key {sorted(dup)[0]!r}")
    if not sets:
        raise EvalError("nothing to evaluate: give --data FILE and/or --niah TASK:LENGTH:N")
    return sets


class _NoSpecial:
    """NIAH fits prompts with ``encode``; count tokens as evaluation tokenises them."""

    def __init__(self, tok):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]


def gen_budget(s: EvalSet, row: dict, cfg: EvalConfig) -> int:
    """Tokens to generate for ``row``: LongBench's per-task budget (upstream ``dataset2maxlen``, capped
    by ``eval.max_gen_tokens`` when set); ``eval.ruler_gen_tokens`` for RULER QA and
    ``eval.niah_gen_tokens`` for NIAH."""
    if s.kind == "longbench":
        n = M.max_gen_tokens(row)
        return min(n, cfg.max_gen_tokens) if cfg.max_gen_tokens else n
    return cfg.ruler_gen_tokens if s.kind == "ruler" else cfg.niah_gen_tokens


def _classes(s: EvalSet) -> Optional[list[str]]:
    return M.task_classes(s.key, s.all_rows) if M.base_task(s.key) in M.CLASSIFICATION_TASKS else None


def row_score(s: EvalSet, row: dict, pred: str, classes: Optional[list[str]], rule: str = "thudm") -> float:
    """One row's primary score, 0-1 (LongBench task metric under ``rule``, RULER first-line hit, NIAH recall)."""
    if s.kind == "longbench":
        return M.score_example(s.key, pred, row["answers"], classes, rule)
    if s.kind == "ruler":
        return float(M.ruler_qa_hit(pred, row["answers"]))
    return niah_recall(pred, row["answers"])


def score_set(s: EvalSet, preds: list[str], rule: str = "thudm") -> dict[str, Any]:
    """Result keys -> scores (0-100) of one set (LongBench under ``rule``). RULER QA gives two:
    ``<task>_<len>`` with upstream ReFINE's first-line rule (the paper's tables) and
    ``<task>_string_match_part_<len>``. A LongBench-E set (``<task>_e`` rows with a ``length``
    column) adds ``<task>_e_by_length``: LongBench's ``scorer_e`` buckets ``{"0-4k", "4-8k", "8k+"}``
    (empty buckets left out). NIAH: RULER's ``string_match_all``."""
    answers = [r["answers"] for r in s.rows]
    if s.kind == "longbench":
        classes = _classes(s)
        out: dict[str, Any] = {s.key: M.score_longbench(s.key, preds, answers, classes, rule)}
        if M.base_task(s.key) != s.key and all("length" in r for r in s.rows):
            lengths = [r["length"] for r in s.rows]
            out[f"{s.key}_by_length"] = M.score_longbench_e(s.key, preds, answers, lengths, classes, rule)
        return out
    if s.kind == "ruler":
        task, length = s.key.rsplit("_", 1)
        return {s.key: M.score_ruler_qa(preds, answers, "first_line"),
                f"{task}_string_match_part_{length}": M.score_ruler_qa(preds, answers, "string_match_part")}
    return {s.key: string_match_all(preds, answers)}


def scorer_of(s: EvalSet, key: str, rule: str) -> dict[str, str]:
    """What produced result ``key`` of set ``s``: its family, metric and (LongBench) rule, for ``meta.scorers``."""
    if s.kind == "longbench":
        return {"family": "longbench", "metric": M.TASK_METRIC[M.base_task(s.key)].__name__, "rule": rule}
    if s.kind == "ruler":
        return {"family": "ruler_qa", "metric": "string_match_part" if "_string_match_part_" in key else "first_line"}
    return {"family": "niah", "metric": NIAH_METRIC}


def build_eval_model(spec: str, cfg: ExperimentConfig, tokenizer_path: Optional[str] = None):
    """``tiny:TYPE`` (random model shaped by ``cfg.model``) or a local HF dir; returns (model, tokenizer).
    Raises ConfigError for ``model.dtype=bfloat16`` without CUDA, EvalError for a bad ``spec`` or
    weights holding a NaN or inf."""
    from refine_ray.data import load_tokenizer
    from refine_ray.models.dtypes import compute_dtype, non_finite_tensor
    from refine_ray.refine.policy import build_policy

    try:
        compute_dtype(cfg.model.dtype)   # bfloat16 (TTT autocast) needs CUDA: one line before anything loads
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if spec.startswith("tiny:"):
        m = cfg.model
        raw = dict(type=spec.split(":", 1)[1], hidden_size=m.hidden_size, num_hidden_layers=m.num_hidden_layers,
                   num_heads=m.num_heads, seed=m.seed, dtype="float32",
                   gradient_checkpointing=m.gradient_checkpointing)
        try:
            mcfg = from_dict(ModelConfig, raw, "model")
            validate_config(mcfg, "model")
        except ConfigError as e:
            raise EvalError(f"--model {spec!r}: {e}") from None
        tok = load_tokenizer(tokenizer_path or cfg.tokenizer.path)
    else:
        if not Path(spec, "config.json").is_file():
            raise EvalError(f"--model {spec!r}: not a local HF model directory (no config.json) nor tiny:TYPE")
        mcfg = ModelConfig(path=spec, dtype="float32",   # fp32 weights; bf16 only as autocast
                           gradient_checkpointing=cfg.model.gradient_checkpointing)
        has_tok = any(Path(spec, f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        tok = load_tokenizer(tokenizer_path or cfg.tokenizer.path or (spec if has_tok else None))
    tok.model_max_length = 1 << 30   # prompts are truncated by eval.max_prompt_tokens, not here
    try:
        model = build_policy(mcfg, len(tok))
    except (ValueError, ImportError) as e:
        raise EvalError(f"--model {spec!r}: {str(e).splitlines()[0]}") from None
    bad = non_finite_tensor(model.state_dict().items())
    if bad:   # it would surface as a sampling error deep in generation or TTT
        raise EvalError(f"--model {spec!r}: tensor '{bad[0]}' holds {bad[1]} non-finite value"
                        f"{'s' if bad[1] > 1 else ''} (NaN or inf) of {bad[2]}; the weights are broken")
    return model, tok


def _eos_ids(model, tok) -> Optional[list[int]]:
    ids = {i for i in (getattr(model.config, "eos_token_id", None), tok.eos_token_id) if isinstance(i, int)}
    return sorted(ids) or None


def stop_ids(s: EvalSet, model, tok) -> tuple[Optional[list[int]], int]:
    """(stop token ids, min new tokens) of a set. samsum also stops at the newline token after at
    least one token, as LongBench's pred.py (eos ids + ``encode('\\n')[-1]``, ``min_length`` =
    prompt + 1); a tokenizer without a newline token (WordPiece) stops at EOS only."""
    eos = _eos_ids(model, tok)
    if s.kind == "longbench" and M.base_task(s.key) == "samsum":
        nl = tok.encode("\n", add_special_tokens=False)
        if nl:
            return sorted(set(eos or []) | {int(nl[-1])}), 1
    return eos, 0


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (temp file + rename)."""
    write_atomic(path, json.dumps(obj, indent=2))


def tokenize_sets(sets: Sequence[EvalSet], tokenizer, ecfg: EvalConfig) -> list[tuple[list[torch.Tensor], int]]:
    """Every prompt as evaluated (no special tokens, middle-truncated to ``max_prompt_tokens``).

    Runs before any model work: a prompt that tokenises to nothing (e.g. whitespace only) is
    a one-line EvalError naming the input and row, so no row is answered and nothing is lost."""
    out = []
    for s in sets:
        ids_list, truncated = [], 0
        for i, row in enumerate(s.rows):
            ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            if not ids:
                raise EvalError(f"{Path(s.source).name}: {s.key} row {i} prompt tokenises to no tokens "
                                f"({row['prompt'][:20]!r}); fix or drop the row")
            truncated += len(ids) > ecfg.max_prompt_tokens
            ids_list.append(torch.tensor(truncate(list(ids), ecfg.max_prompt_tokens, "middle"), dtype=torch.long))
        out.append((ids_list, truncated))
    return out


def run_settings(model, tokenizer, cfg: ExperimentConfig, ecfg: EvalConfig, model_id: Optional[str]) -> dict:
    """What must match for a re-run to resume: model, tokenizer, the configs that shape answers."""
    mc = model.config.to_dict() if hasattr(model.config, "to_dict") else {}
    return {"model": model_id or mc.get("_name_or_path") or "?",
            "model_config": {k: v for k, v in mc.items() if k not in ("_name_or_path", "transformers_version")},
            "tokenizer": {"name": getattr(tokenizer, "name_or_path", "?"), "size": len(tokenizer)},
            **{sec: asdict(getattr(cfg, sec)) for sec in ("model", "refine", "optim", "reward")},
            "eval": {k: v for k, v in asdict(ecfg).items() if k != "limit"}}


def run_eval(model, tokenizer, cfg: ExperimentConfig, ecfg: EvalConfig, sets: list[EvalSet], name: str,
             out: Optional[Path] = None, show_progress: bool = True, model_id: Optional[str] = None,
             engine=None) -> dict[str, Any]:
    """Answer and score every set; returns (and writes to ``out``) the result dict.

    With ``out``, each answered batch is saved at once to ``<out>.predictions.jsonl`` (row,
    prediction, answers, 0-1 score) and a re-run with the same ``out`` resumes (see
    ``refine_ray.eval.progress``). With ``ecfg.backend == 'vllm'`` the answers come from vLLM
    (:class:`refine_ray.serving.vllm_generate.VLLMGreedy`: the same greedy/stop rules, no TTT);
    ``engine``: a started VLLMGreedy of this model to reuse (left open), else one is started and closed.
    Raises EvalError (one line) on an empty prompt, a refused resume, or vLLM missing / not serving the model.
    """
    t0 = time.time()
    prompts = tokenize_sets(sets, tokenizer, ecfg)
    log = PredictionLog(out, run_settings(model, tokenizer, cfg, ecfg, model_id), EvalError) if out else None
    if log and log.records and ecfg.ttt.accumulate and ecfg.ttt.mode != "none":
        raise EvalError(f"{log.path.name}: cannot resume a run with eval.ttt.accumulate=true (its weights depend "
                        f"on every earlier row); use another --out")
    trainer = TestTimeTrainer(model, cfg, ecfg.ttt, tokenizer)
    own = ecfg.backend == "vllm" and engine is None
    if own:
        engine = _vllm_engine(model, sets, prompts, ecfg)
    try:
        return _answer_sets(model, tokenizer, ecfg, sets, name, out, show_progress, prompts, log, trainer,
                            engine if ecfg.backend == "vllm" else None, t0)
    finally:
        if own:
            engine.close()


def _vllm_engine(model, sets: list[EvalSet], prompts, ecfg: EvalConfig):
    """eval.backend=vllm: a VLLMGreedy whose context holds the longest prompt + answer; one-line EvalError
    when vLLM is missing or does not serve the model type."""
    longest = max((len(t) for toks, _ in prompts for t in toks), default=1)
    budget = max((gen_budget(s, row, ecfg) for s in sets for row in s.rows), default=1)
    try:
        from refine_ray.serving.vllm_generate import VLLMGreedy

        return VLLMGreedy(model, longest + budget)
    except (ImportError, ValueError) as e:
        raise EvalError(str(e).splitlines()[0]) from None


def _answer_sets(model, tokenizer, ecfg: EvalConfig, sets, name, out, show_progress, prompts, log, trainer,
                 engine, t0) -> dict[str, Any]:
    """run_eval's loop: answer each set's rows (TTT + native generation, or the vLLM ``engine``), log, score."""
    from tqdm import tqdm

    answer = engine.answer if engine is not None else trainer.answer
    result: dict[str, Any] = {"run_name": name}
    per_set, scorers, resumed = {}, {}, 0
    total = sum(len(s.rows) for s in sets)
    with tqdm(total=total, desc=f"eval {name}", unit="row", disable=not show_progress) as bar:
        for s, (toks, truncated) in zip(sets, prompts):
            classes = _classes(s) if s.kind == "longbench" else None
            recs: dict[int, dict] = {}
            for i, row in enumerate(s.rows):
                rec = log.done(s.key, i, row["prompt"]) if log else None
                if rec is not None:
                    recs[i] = rec
            resumed += len(recs)
            bar.update(len(recs))
            todo = [i for i in range(len(s.rows)) if i not in recs]
            budgets = [gen_budget(s, row, ecfg) for row in s.rows]
            stop, min_new = stop_ids(s, model, tokenizer)
            bar.set_postfix(task=s.key)
            step = ecfg.ttt.batch_size if engine is None else VLLM_BATCH
            for b in range(0, len(todo), step):   # one TTT (or vLLM) batch at a time, saved at once
                idx = todo[b:b + step]
                outs = answer([toks[i] for i in idx], [budgets[i] for i in idx], eos_token_id=stop,
                                      progress=bar, min_new_tokens=min_new)
                for i, o in zip(idx, outs):
                    row = s.rows[i]
                    pred = tokenizer.decode(o.tolist(), skip_special_tokens=True)
                    recs[i] = {"set": s.key, "row": i, "prediction": pred, "answers": list(row["answers"]),
                               "score": row_score(s, row, pred, classes, ecfg.longbench_rule),
                               "prompt_sha1": prompt_hash(row["prompt"])}
                    if log:
                        log.add(recs[i])
                if log:
                    log.save()
            scores = score_set(s, [recs[i]["prediction"] for i in range(len(s.rows))], ecfg.longbench_rule)
            result.update(scores)
            scorers.update({k: scorer_of(s, k, ecfg.longbench_rule) for k in scores})
            per_set[s.key] = {"rows": len(s.rows), "source": s.source, "truncated_prompts": truncated,
                              "stop_token_ids": stop, "min_new_tokens": min_new}
    result["meta"] = {"model": getattr(model.config, "model_type", "?"), "ttt": asdict(ecfg.ttt),
                      "eval": {k: v for k, v in asdict(ecfg).items() if k != "ttt"},
                      "sets": per_set, "resumed_rows": resumed, "longbench_rule": ecfg.longbench_rule,
                      "scorers": scorers,
                      "ttt_metrics": trainer.summary(), "seconds": round(time.time() - t0, 2)}
    if out is not None:
        write_json_atomic(out, result)
    return result
