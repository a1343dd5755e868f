"""Submit `refine-ray train --config FILE key=value ...` to a running Ray cluster as a Ray job.

    scripts/submit_job.sh --config configs/tiny_deltanet_mid.yaml train.steps=20
    scripts/submit_job.sh --address http://127.0.0.1:8265 --follow -- train.steps=20

The repo is uploaded as the job's working_dir (without .venv, .cache, outputs, .git), so the
cluster runs exactly this checkout. `system.ray_address=auto` is appended unless given, so the
driver joins the cluster instead of starting its own. Relative data.path / train.output_dir
would resolve inside the uploaded copy: they are made absolute here (the cluster must see the
same paths, e.g. a shared mount). Python: the driver runs with --python (default: this venv's
interpreter when the address is loopback, else `python` from the cluster image); workers use the
interpreter the cluster was started with unless --py-executable names another, and --pip installs
a requirements file into a per-job virtualenv (slow, needs a package index; avoid for torch).

Token auth (Ray >= 2.52): RAY_AUTH_MODE=token is set and RAY_AUTH_TOKEN is read from the
environment, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token. The token is never printed and never put
into the job's runtime_env.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXCLUDES = [".venv", ".cache", "outputs", "runs", ".git", "**/__pycache__", "*.pyc", ".pytest_cache", ".whl",
            "*.egg-info"]
ENV_VARS = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "RAY_USAGE_STATS_ENABLED": "0"}
PATH_KEYS = ("data.path", "train.output_dir", "model.path", "tokenizer.path")


def setup_auth() -> str:
    """Export RAY_AUTH_MODE / RAY_AUTH_TOKEN for the client; returns where the token came from."""
    if os.environ.get("RAY_AUTH_MODE", "token") == "disabled":
        return "disabled"
    os.environ["RAY_AUTH_MODE"] = "token"
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if path.is_file() and path.read_text().strip():
        os.environ["RAY_AUTH_TOKEN"] = path.read_text().strip()
        return str(path)
    sys.exit(f"submit_job: no Ray auth token (set RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or create {path}; "
             f"RAY_AUTH_MODE=disabled for a cluster without auth)")


def absolutize(cfg_path: str, overrides: list[str]) -> list[str]:
    """Relative paths (from the config or the overrides) resolve against the repo, as the local CLI
    run from the repo root would; pass them as absolute overrides so the job's cwd does not matter."""
    sys.path.insert(0, str(ROOT))
    from refine_ray.config import ExperimentConfig, read_config_file

    raw = read_config_file(cfg_path)          # with the files its ``defaults`` name
    given = dict(o.split("=", 1) for o in overrides if "=" in o)
    out = list(overrides)
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = given.get(key, (raw.get(section) or {}).get(name, getattr(getattr(ExperimentConfig(), section), name)))
        if not isinstance(value, str) or value in ("", "null", "None") or os.path.isabs(value):
            continue
        out = [o for o in out if not o.startswith(key + "=")] + [f"{key}={(ROOT / value).resolve()}"]
    return out


def _is_loopback(address: str) -> bool:
    from urllib.parse import urlparse

    return (urlparse(address if "://" in address else f"http://{address}").hostname or "") in (
        "127.0.0.1", "localhost", "::1")


def build(args: argparse.Namespace) -> tuple[str, dict]:
    config = Path(args.config)
    config_rel = os.path.relpath(config.resolve(), ROOT)
    if config_rel.startswith(".."):
        sys.exit(f"submit_job: --config {config} must be inside the repo ({ROOT}) to travel with it")
    overrides = list(args.overrides)
    if not any(o.startswith("system.ray_address=") for o in overrides):
        overrides.append("system.ray_address=auto")
    if not args.keep_relative_paths:
        overrides = absolutize(str(config), overrides)
    import shlex

    python = args.python or (sys.executable if _is_loopback(args.address) else "python")
    entrypoint = shlex.join([python, "-m", "refine_ray.cli", "train", "--config", config_rel, *overrides])
    env = dict(ENV_VARS)
    for item in args.env:
        k, sep, v = item.partition("=")
        if not sep or k.upper().startswith("RAY_AUTH"):
            sys.exit(f"submit_job: --env {k}: expected KEY=VALUE (and never RAY_AUTH_*)")
        env[k] = v
    runtime_env: dict = {"working_dir": str(ROOT), "excludes": EXCLUDES, "env_vars": env}
    if args.py_executable:
        runtime_env["py_executable"] = args.py_executable
    if args.pip:
        runtime_env["pip"] = args.pip
    return entrypoint, runtime_env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="submit_job", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265",
                   help="Ray dashboard address (default $RAY_ADDRESS or http://127.0.0.1:8265)")
    p.add_argument("--config", default="configs/tiny_deltanet_mid.yaml")
    p.add_argument("--submission-id", default=None, help="job id (default refine-<config stem>-<time>)")
    p.add_argument("--python", default=None, help="interpreter that runs the driver (default: this venv's "
                   "python for a loopback address, else `python` on the cluster's PATH)")
    p.add_argument("--py-executable", default=None, help="interpreter for the job's workers (runtime_env)")
    p.add_argument("--pip", default=None, help="requirements.txt to install per job (slow; needs an index)")
    p.add_argument("--env", action="append", default=[], help="extra KEY=VALUE for the job (repeatable)")
    p.add_argument("--keep-relative-paths", action="store_true", help="do not absolutize data/output paths")
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    p.add_argument("--dry-run", action="store_true", help="print entrypoint and runtime_env; submit nothing")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.steps=20")
    args = p.parse_args(argv)
    entrypoint, runtime_env = build(args)
    sub_id = args.submission_id or f"refine-{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.dry_run:
        import json

        print(json.dumps({"address": args.address, "submission_id": sub_id, "entrypoint": entrypoint,
                          "runtime_env": runtime_env}, indent=2))
        return 0
    source = setup_auth()
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(args.address)
        for attempt in range(13):                 # a fresh head's job agent needs a few seconds
            try:
                job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=sub_id)
                break
            except RuntimeError as e:
                if "No available agent" not in str(e) or attempt == 12:
                    raise
                time.sleep(5)
    except (RuntimeError, ConnectionError, ValueError) as e:
        sys.exit(f"submit_job: {args.address}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    print(f"submitted {job_id} to {args.address} (auth: {source})\n  entrypoint: {entrypoint}")
    print(f"  follow:  ray job logs -f --address {args.address} {job_id}\n"
          f"  status:  ray job status --address {args.address} {job_id}\n"
          f"  stop:    ray job stop --address {args.address} {job_id}\n"
          f"  (CLI needs RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, as scripts/submit_job.sh sets)")
    if not args.follow:
        return 0
    import asyncio

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status}")
    return 0 if status == JobStatus.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
