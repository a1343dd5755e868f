"""``refine-ray`` command line.

    refine-ray train  --config FILE [key.path=value ...]
    refine-ray eval   --model PATH|tiny:TYPE --data FILE [--data ...] [--niah TASK:LEN:N] [--limit N]
                      [--ttt none|ntp|refine] [--out results/run.json] [--name RUN] [--config FILE]
                      [key.path=value | eval.key=value ...]
    refine-ray export --from CKPT|HF_DIR|tiny:TYPE --out DIR [--run-config RUN/config.json] [--overwrite]
    refine-ray plan   --config FILE [key.path=value ...] [--gpu-memory GiB] [--ttt]   (exit 1: does not fit)
    refine-ray generate --model HF_DIR|tiny:TYPE --prompt TEXT [--prompt ...] [--max-new-tokens N]
                      [--temperature T] [--top-p P] [--seed S]

Relative paths, in a config file as on the command line, are read from the directory the command
runs in. Exit status: 0 done; 2 bad input (one line); 3 a learner rank failed; 130 Ctrl-C.
"""
from __future__ import annotations

import argparse
import sys

from refine_ray.config import ConfigError, load_config

INTERRUPTED = 130                 # the shell's status for a process stopped by SIGINT (128 + 2)


def _add_eval(sub) -> None:
    ev = sub.add_parser("eval", help="answer and score LongBench / RULER / NIAH (optionally with TTT)")
    ev.add_argument("--model", required=True, help="local HF model dir, or tiny:TYPE for a random tiny model")
    ev.add_argument("--data", action="append", default=[], help="LongBench or RULER parquet file (repeatable)")
    ev.add_argument("--niah", action="append", default=[],
                    help="RULER NIAH task TASK:LENGTH:N, e.g. niah_multikey_1:4096:20 (repeatable)")
    ev.add_argument("--limit", type=int, help="evaluate the first N rows of each file")
    ev.add_argument("--ttt", choices=["none", "ntp", "refine"], help="test-time training mode (default none)")
    ev.add_argument("--ttt-steps", type=int, help="optimizer steps per prompt batch")
    ev.add_argument("--ttt-batch-size", type=int, help="prompts adapted on together")
    ev.add_argument("--accumulate", action="store_true", default=None,
                    help="keep adapting across prompts (upstream ReFINE); default: restore after each batch")
    ev.add_argument("--max-gen-tokens", type=int, help="cap LongBench's per-row max_gen_tokens (upstream ReFINE: 32)")
    ev.add_argument("--max-prompt-tokens", type=int, help="truncate longer prompts from the middle")
    ev.add_argument("--config", help="experiment YAML for refine/optim/tokenizer/model-shape settings")
    ev.add_argument("--tokenizer", help="tokenizer dir (default: the model dir's, else the offline MiniLM one)")
    ev.add_argument("--out", help="result JSON (default results/<name>.json)")
    ev.add_argument("--name", help="run name in the result (default <model dir's run>-ttt_<mode>)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.add_argument("overrides", nargs="*", help="dotted overrides: refine.n_chunks=4, eval.ttt.steps=2, ...")


def _add_export(sub) -> None:
    ex = sub.add_parser("export", help="write a Hugging Face checkpoint directory (atomic)")
    ex.add_argument("--from", dest="source", required=True,
                    help="DeepSpeed checkpoint dir, state-dict file, HF dir, or tiny:TYPE")
    ex.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    ex.add_argument("--tokenizer", help="tokenizer dir to save with the model (default: the run's / MiniLM)")
    ex.add_argument("--run-config", help="the run's config.json (ExperimentConfig) for checkpoints/state dicts")
    ex.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ex.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def _add_generate(sub) -> None:
    gen = sub.add_parser("generate", help="continue a few prompts with a model (our cached-state engine)")
    gen.add_argument("--model", required=True, help="local HF model dir (e.g. an export), or tiny:TYPE")
    gen.add_argument("--prompt", action="append", default=[], help="text to continue (repeatable)")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the sampling draws")
    gen.add_argument("--tokenizer", help="tokenizer dir (default: the model dir's, else the offline MiniLM one)")
    gen.add_argument("--config", help="experiment YAML (model shape for tiny:TYPE)")


def _generate(args) -> int:
    from transformers.utils import logging as hf_logging

    from refine_ray.data import DataError
    from refine_ray.eval.evaluate import EvalError
    from refine_ray.eval.generate_text import generate_text

    hf_logging.set_verbosity_error()          # the output is the continuations: no loading bars or notices
    hf_logging.disable_progress_bar()
    try:
        texts = generate_text(args.model, args.prompt, load_config(args.config), args.max_new_tokens,
                              args.temperature, args.top_p, args.seed, args.tokenizer)
    except ConfigError as e:
        print(f"refine-ray: config error: {e}", file=sys.stderr)
        return 2
    except (EvalError, DataError) as e:
        print(f"refine-ray: {e}", file=sys.stderr)
        return 2
    for prompt, text in zip(args.prompt, texts):
        print(f">>> {prompt}\n{text}\n")
    return 0


def _add_plan(sub) -> None:
    pl = sub.add_parser("plan", help="the memory plan of a config per actor and per GPU, and whether it fits")
    pl.add_argument("--config", required=True, help="experiment YAML, e.g. configs/paper_mid_deltanet_1.3b.yaml")
    pl.add_argument("--gpu-memory", type=float, help="GiB per GPU (default: this machine's GPU; required without CUDA)")
    pl.add_argument("--ttt", action="store_true", help="plan `refine-ray eval --ttt` (one process, one GPU) instead "
                    "(without it too for a config whose eval.ttt.mode is not none)")
    pl.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.max_length=8192")


def _plan(args) -> int:
    from refine_ray.plan import run_plan_command

    return run_plan_command(args.config, args.overrides, args.gpu_memory, args.ttt)


def _unwritable(path: str, is_dir: bool) -> bool:
    """``--out`` cannot be written (checked before any work): print the one line and say so."""
    from refine_ray.preflight import PreflightError, check_writable

    try:
        check_writable(path, "--out", is_dir)
    except PreflightError as e:
        print(f"refine-ray: {e}", file=sys.stderr)
        return True
    return False


def _eval(args) -> int:
    if args.out and _unwritable(args.out, is_dir=False):
        return 2
    from pathlib import Path

    from refine_ray.data import DataError
    from refine_ray.eval.data import DataError as EvalDataError
    from refine_ray.eval.evaluate import EvalError, build_eval_model, load_eval_sets, run_eval
    from refine_ray.eval.summary import default_run_name, summary_line
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()         # loading a model dir: the eval's own bar is the one to watch

    # Flags are shorthands for eval.* overrides; everything lands in one typed config.
    flags = {"eval.limit": args.limit, "eval.max_gen_tokens": args.max_gen_tokens,
             "eval.max_prompt_tokens": args.max_prompt_tokens, "eval.ttt.mode": args.ttt,
             "eval.ttt.steps": args.ttt_steps, "eval.ttt.batch_size": args.ttt_batch_size,
             "eval.ttt.accumulate": args.accumulate}
    overrides = list(args.overrides) + [f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                                        for k, v in flags.items() if v is not None]
    out = None
    try:
        cfg = load_config(args.config, overrides)
        ecfg = cfg.eval
        model, tok = build_eval_model(args.model, cfg, args.tokenizer)
        sets = load_eval_sets(args.data, args.niah, tok, ecfg.limit, ecfg)
        name = args.name or default_run_name(args.model, ecfg.ttt.mode)
        out = Path(args.out) if args.out else Path("results") / f"{name}.json"
        result = run_eval(model, tok, cfg, ecfg, sets, name, out, show_progress=not args.no_progress,
                          model_id=args.model)
    except ConfigError as e:
        print(f"refine-ray: config error: {e}", file=sys.stderr)
        return 2
    except (EvalError, DataError, EvalDataError) as e:
        print(f"refine-ray: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:           # a TTT step went non-finite: not applied, answers so far kept
        kept = f"the answers given so far are saved for --out '{out}'" if out else "no answer yet"
        print(f"refine-ray: {e}; {kept}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:                 # answers are saved after every batch; the same --out resumes
        kept = f"the answers given so far are saved for --out '{out}'" if out else "no answer yet"
        print(f"\nrefine-ray: interrupted; {kept}; run the same command to resume", file=sys.stderr)
        return INTERRUPTED
    print(summary_line(result, out))
    return 0


def _export(args) -> int:
    if _unwritable(args.out, is_dir=True):
        return 2
    from transformers.utils import logging as hf_logging

    from refine_ray.data import DataError
    from refine_ray.export import ExportError, export_model

    hf_logging.disable_progress_bar()         # its output is the final line: no "Writing model shards" bar
    try:
        model = export_model(args.source, args.out, args.tokenizer, args.run_config, args.dtype, args.overwrite)
    except (ExportError, DataError, ConfigError) as e:
        print(f"refine-ray: {e}", file=sys.stderr)
        return 2
    n = sum(p.numel() for p in model.parameters())
    step = "" if model.export_step is None else f" (checkpoint step {model.export_step})"
    print(f"exported {model.config.model_type} ({n / 1e6:.1f}M params, {args.dtype}) from {args.source}{step} "
          f"to {args.out}")
    return 0


def _train(args) -> int:
    from refine_ray.system import run_log

    run_log.show_phases()          # phase lines on the console; everything kept for <output_dir>/run.log
    try:
        cfg = load_config(args.config, args.overrides, hub=True)    # hub ids -> local snapshots, once, here
    except ConfigError as e:
        print(f"refine-ray: config error: {e}", file=sys.stderr)
        return 2
    # nothing heavy (torch, Ray) is imported before preflight has checked the paths
    from refine_ray.data import DataError
    from refine_ray.preflight import PreflightError
    from refine_ray.transport.checkpoint import CheckpointError
    from refine_ray.system.run_dir import RunDirError
    from refine_ray.train import TrainingInterrupted, run_training

    status, line = 0, None
    try:
        history = run_training(cfg)
    except (DataError, ConfigError, PreflightError, RunDirError, CheckpointError) as e:
        status, line = 2, f"refine-ray: {e}"
    except RuntimeError as e:                    # a learner rank failed: one line with the way to resume
        from refine_ray.system.actor_group import LearnerFailure

        if not isinstance(e, LearnerFailure):
            raise
        status, line = 3, f"refine-ray: {e}"
    except TrainingInterrupted as e:             # Ctrl-C: actors and Ray already stopped
        status, line = INTERRUPTED, f"\nrefine-ray: {e}"
    if line is not None:
        print(line, file=sys.stderr)
        run_log.note(line.strip())
        return status
    if not history:
        print(f"nothing to do: the run in {cfg.train.output_dir} is already at train.steps={cfg.train.steps} "
              f"(raise train.steps to continue, or train.overwrite=true to start over)")
        return 0
    last = history[-1]
    line = (f"done: {len(history)} steps, loss {last['loss']:.4f}, reward {last['train_cuts/reward_mean']:.4f}, "
            f"weights v{int(last['version'])}; outputs in {cfg.train.output_dir}")
    print(line)
    run_log.note(line)
    return 0


def _not_noise(record) -> bool:
    """DeepSpeed's logger prints to stdout, a command's output: its known noise ("Setting accelerator to
    CPU", :data:`refine_ray.system.run_log.NOISE`) is dropped there."""
    from refine_ray.system.run_log import is_noise

    return not is_noise(record.getMessage())


def main(argv: list[str] | None = None) -> int:
    """``refine-ray train|eval|export|generate|plan``: returns the exit status (0 done; 2 bad input or run dir/checkpoint
    problem, one line on stderr; 3 a learner rank failed; 130 interrupted by Ctrl-C, one line).
    ``argv`` defaults to ``sys.argv[1:]``."""
    parser = argparse.ArgumentParser(prog="refine-ray", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run a REFINE training job")
    train.add_argument("--config", required=True, help="experiment YAML, e.g. configs/tiny_deltanet_mid.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. refine.n_chunks=4 train.steps=10")
    _add_eval(sub)
    _add_export(sub)
    _add_plan(sub)
    _add_generate(sub)
    args, extra = parser.parse_known_args(argv)
    if extra:   # eval's dotted overrides may follow its options; anything else is an error as before
        if args.command != "eval" or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        if args.command == "train":
            return _train(args)
        import logging
        import warnings

        # fla warns on import on every CPU machine; the pure-PyTorch ops are the intended CPU path
        # (train keeps the warning in its run log instead: refine_ray.system.run_log)
        warnings.filterwarnings("ignore", message="Triton is not supported on current platform")
        logging.getLogger("DeepSpeed").addFilter(_not_noise)        # once: addFilter skips a filter it has
        return {"eval": _eval, "export": _export, "generate": _generate, "plan": _plan}[args.command](args)
    except KeyboardInterrupt:                    # before a command's own handling (imports, config)
        print("\nrefine-ray: interrupted; nothing was started; run the same command to start", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
