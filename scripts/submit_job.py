"""Submit `refine-ray train --config FILE key=value ...` to a running Ray cluster as a Ray job.

    scripts/submit_job.sh --config configs/tiny_deltanet_mid.yaml train.steps=20
    scripts/submit_job.sh --address http://127.0.0.1:8265 --follow train.steps=20
    scripts/submit_job.sh --dry-run train.steps=20          # entrypoint, runtime_env, upload size

The config is loaded here first, as `refine-ray train` loads it (a bad key or value stops with one
line before anything is uploaded), and every path-typed field of it (found from the config's types:
refine_ray.config.path_fields) goes to the job as an absolute path: relative paths, in the file or
on the command line, name paths from the directory this runs in, as for a local run, while the
job runs in an unpacked copy of this repo. The cluster must see those paths (the same machine, or
a shared mount). For a cluster that does not share this machine's files, --paths-as-written passes
the config and overrides untouched (not loaded here; the job checks them).

The repo is uploaded as the job's working_dir without any virtualenv (a directory holding
pyvenv.cfg, or named .venv*), cache folders, run outputs and what git ignores; the upload's size is
printed (Ray's own packaging, the same files it sends). `system.ray_address=auto` is appended unless
given, so the driver joins the cluster instead of starting its own. Python: the driver runs with
--python (default: this venv's interpreter when the address is loopback, else `python` from the
cluster image); workers use the interpreter the cluster was started with unless --py-executable
names another, and --pip installs a requirements file into a per-job virtualenv (slow, needs a
package index; avoid for torch).

Token auth (Ray >= 2.52): RAY_AUTH_MODE=token is set and RAY_AUTH_TOKEN is read from the
environment, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token. The token is never printed and never put
into the job's runtime_env.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV_VARS = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "RAY_USAGE_STATS_ENABLED": "0"}
# Folders never uploaded, at any depth: tool caches (Python, notebooks, test runners, linters, JS).
CACHE_DIRS = ("__pycache__", ".cache", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis",
              ".ipynb_checkpoints", ".tox", ".nox", ".eggs", "node_modules")
# Patterns (gitignore syntax, relative to the repo) always excluded: git, virtualenvs by name, caches,
# build leftovers, and what runs write into the repo (outputs, TensorBoard runs, W&B, MLflow's defaults).
ALWAYS_EXCLUDED = (".git", ".venv*", *(f"**/{d}" for d in CACHE_DIRS), "*.pyc", "*.egg-info", "/.whl",
                   "/outputs", "/runs", "/wandb", "/mlruns", "/mlartifacts", "/mlflow.db")


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


def path_overrides(config: str, overrides: list[str]) -> list[str]:
    """Load the config as `refine-ray train` does (relative paths resolve against the working
    directory) and return the overrides plus ``key=<absolute path>`` for every path-typed field.
    A bad config exits with its one line; an input path that does not exist here stays as written,
    with one warning line (the job would look for it inside its copy of the repo)."""
    sys.path.insert(0, str(ROOT))
    from refine_ray.config import ConfigError, load_config, path_fields

    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        sys.exit(f"submit_job: config error: {e}")
    out = [o for o in overrides if o.partition("=")[0].strip() not in path_fields(cfg)]
    for key, value in path_fields(cfg).items():
        relative = [v for v in (value if isinstance(value, list) else [value]) if not os.path.isabs(v)]
        if relative:
            print(f"submit_job: warning: {key}: '{relative[0]}' is not a path on this machine; the job reads it "
                  f"as written (relative paths: inside its copy of the repo)", file=sys.stderr)
        out.append(f"{key}={_yaml_value(value)}")
    return out


def _yaml_value(value) -> str:
    """``value`` as the override parser (YAML) reads it back: plain when it round-trips, else JSON."""
    import yaml

    plain = value if isinstance(value, str) else None
    if plain is not None and yaml.safe_load(plain) == plain:
        return plain
    return json.dumps(value)


def upload_excludes(root: Path) -> list[str]:
    """``runtime_env.excludes`` for uploading ``root``: :data:`ALWAYS_EXCLUDED`, every virtualenv
    (a directory holding ``pyvenv.cfg``, whatever its name) and cache folder found under ``root``,
    and every path git ignores there (``git ls-files --others --ignored``; skipped when ``root`` is
    not a git work tree). Patterns are gitignore-style and anchored at ``root``."""
    ignored = _git_ignored(root)
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        keep = []
        for name in sorted(dirnames):
            path = (rel / name).as_posix()
            if name == ".git" or path in ignored or name.startswith(".venv") or name in CACHE_DIRS:
                continue                                   # excluded by a pattern already
            if (Path(dirpath) / name / "pyvenv.cfg").is_file():
                found.append(f"/{path}")
            else:
                keep.append(name)
        dirnames[:] = keep
    from ray._private.thirdparty.pathspec import PathSpec     # the matcher Ray applies to runtime_env excludes

    always = PathSpec.from_lines("gitwildmatch", ALWAYS_EXCLUDED)
    extra = [f"/{p}" for p in sorted(ignored) if not always.match_file(p)]
    return list(dict.fromkeys([*ALWAYS_EXCLUDED, *found, *extra]))


def _git_ignored(root: Path) -> set[str]:
    """Paths under ``root`` that git ignores (directories collapsed, no trailing slash); empty when
    git or a work tree is missing."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "--others", "--ignored", "--exclude-standard",
                              "--directory", "-z"], capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return {p.rstrip("/") for p in out.decode().split("\0") if p}


def upload_size(root: Path, excludes: list[str]) -> tuple[int, int]:
    """(bytes, files) of the package Ray's job submission uploads for ``working_dir=root`` with
    ``excludes``: built by Ray's own packaging (its default excludes, .gitignore/.rayignore files,
    ours) into a temporary zip."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import create_package

    quiet = logging.getLogger("submit_job.packaging")
    quiet.setLevel(logging.ERROR)
    use_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "working_dir.zip"
        create_package(str(root), package, include_gitignore=use_gitignore,
                       excludes=ray_constants.get_runtime_env_default_excludes() + excludes, logger=quiet)
        with zipfile.ZipFile(package) as z:
            return package.stat().st_size, sum(not i.is_dir() for i in z.infolist())


def _is_loopback(address: str) -> bool:
    from urllib.parse import urlparse

    return (urlparse(address if "://" in address else f"http://{address}").hostname or "") in (
        "127.0.0.1", "localhost", "::1")


def build(args: argparse.Namespace) -> tuple[str, dict]:
    """The job's entrypoint (a shell line) and runtime_env for ``args``; exits with one line on bad input."""
    config = Path(args.config).resolve()
    config_rel = os.path.relpath(config, ROOT)
    if config_rel.startswith(".."):
        sys.exit(f"submit_job: --config {args.config} must be inside the repo ({ROOT}) to travel with it")
    overrides = list(args.overrides)
    if not args.paths_as_written:
        overrides = path_overrides(str(config), overrides)
    if not any(o.startswith("system.ray_address=") for o in overrides):
        overrides.append("system.ray_address=auto")
    python = args.python or (sys.executable if _is_loopback(args.address) else "python")
    entrypoint = shlex.join([python, "-m", "refine_ray.cli", "train", "--config", config_rel, *overrides])
    env = dict(ENV_VARS)
    for item in args.env:
        k, sep, v = item.partition("=")
        if not sep or k.upper().startswith("RAY_AUTH"):
            sys.exit(f"submit_job: --env {k}: expected KEY=VALUE (and never RAY_AUTH_*)")
        env[k] = v
    runtime_env: dict = {"working_dir": str(ROOT), "excludes": upload_excludes(ROOT), "env_vars": env}
    if args.py_executable:
        runtime_env["py_executable"] = args.py_executable
    if args.pip:
        runtime_env["pip"] = args.pip
    return entrypoint, runtime_env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="submit_job", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265",
                   help="Ray dashboard address (default $RAY_ADDRESS or http://127.0.0.1:8265)")
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny_deltanet_mid.yaml"))
    p.add_argument("--submission-id", default=None, help="job id (default refine-<config stem>-<time>)")
    p.add_argument("--python", default=None, help="interpreter that runs the driver (default: this venv's "
                   "python for a loopback address, else `python` on the cluster's PATH)")
    p.add_argument("--py-executable", default=None, help="interpreter for the job's workers (runtime_env)")
    p.add_argument("--pip", default=None, help="requirements.txt to install per job (slow; needs an index)")
    p.add_argument("--env", action="append", default=[], help="extra KEY=VALUE for the job (repeatable)")
    p.add_argument("--paths-as-written", action="store_true",
                   help="do not load the config here: paths go to the job as written (a cluster that does "
                        "not share this machine's files; the job checks them)")
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    p.add_argument("--dry-run", action="store_true", help="print entrypoint, runtime_env and upload size; submit nothing")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.steps=20")
    args = p.parse_args(argv)
    source = None if args.dry_run else setup_auth()     # before anything imports Ray: it reads RAY_AUTH_MODE once
    entrypoint, runtime_env = build(args)
    size, files = upload_size(ROOT, runtime_env["excludes"])
    upload = f"upload: {size / 2**20:.1f} MiB zipped, {files} files from {ROOT}"
    sub_id = args.submission_id or f"refine-{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.dry_run:
        print(json.dumps({"address": args.address, "submission_id": sub_id, "entrypoint": entrypoint,
                          "runtime_env": runtime_env, "upload": {"bytes": size, "files": files}}, indent=2))
        print(upload)
        return 0
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
    print(f"submitted {job_id} to {args.address} (auth: {source}; {upload})\n  entrypoint: {entrypoint}")
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
