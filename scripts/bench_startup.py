"""Start-up time of the README's main job, as a user sees it (issue 23 point 3).

Runs ``bash scripts/train.sh --config configs/tiny_deltanet_mid.yaml`` ``--runs`` times as a
subprocess, each into a fresh ``train.output_dir`` (so every run starts from scratch, never
resumes), reads its console as it arrives and records, in seconds since the process started:

* ``first_bar``: the first progress-bar line (the training loop is entered: every role is up);
* ``first_step``: the bar showing step 1 done (the first step's metrics are in);
* ``done``: the ``done:`` line; ``exit``: the process has ended (Ray shut down);
* each phase line the program prints (``[  3.1s] ...``), under its text up to ``:`` or ``(`` with
  numbers written N.

Then ``--runs`` times the same command with ``data.path`` pointing at a file that does not
exist: the time until that one-line error and the process's exit.

Prints the median and the spread (min-max) of each and, with ``--json``, writes every run.
The first run after a fresh install also compiles DeepSpeed's comm op; pass ``--warmup 1``
to run (and not count) one job first.

``--root DIR`` (repeatable) measures other checkouts of the project side by side: runs alternate
between them (so a busy spell of a shared machine hits each alike), each imports its own
``refine_ray`` (``PYTHONPATH=DIR``) and uses this checkout's ``.venv`` if it has none, and the
ratio of each median to the first root's is printed.

    nice -n 10 .venv/bin/python scripts/bench_startup.py --runs 5 --warmup 1 --json startup.json
    nice -n 10 .venv/bin/python scripts/bench_startup.py --root /tmp/before --root . --runs 5 --warmup 1
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/tiny_deltanet_mid.yaml"
PHASE = re.compile(r"^\[\s*([\d.]+)\s*s\]\s*([^:(]*)")      # "[  3.1s] Ray up: ..." -> 3.1, "Ray up"


def timed_console(cmd: list[str], cwd: Path, timeout: float) -> tuple[list[tuple[float, str]], int, float]:
    """Run ``cmd`` in checkout ``cwd`` (its ``refine_ray`` first on the path); returns its console pieces
    (split at newlines and carriage returns, as tqdm redraws) each with the second it arrived, its exit
    code and the total seconds."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(cwd))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    pieces, buf = [], b""
    while True:
        chunk = os.read(proc.stdout.fileno(), 65536)
        now = time.perf_counter() - t0
        if not chunk:
            break
        buf += chunk
        *done, buf = re.split(rb"[\r\n]", buf)
        pieces += [(now, p.decode(errors="replace")) for p in done if p.strip()]
        if now > timeout:
            proc.kill()
            break
    if buf.strip():
        pieces.append((time.perf_counter() - t0, buf.decode(errors="replace")))
    rc = proc.wait()
    return pieces, rc, time.perf_counter() - t0


def first(pieces: list[tuple[float, str]], pattern: str) -> float | None:
    rx = re.compile(pattern)
    return next((t for t, p in pieces if rx.search(p)), None)


def train_run(root: Path, out_dir: Path, timeout: float) -> dict:
    cmd = ["bash", "scripts/train.sh", "--config", CONFIG, f"train.output_dir={out_dir}"]
    pieces, rc, total = timed_console(cmd, root, timeout)
    run = {"rc": rc, "exit": total, "first_bar": first(pieces, r"\| *0/\d+ \["),
           "first_step": first(pieces, r"\| *1/\d+ \["), "done": first(pieces, r"^done:"),
           "console_lines": len({p for _, p in pieces if not re.search(r"\d+/\d+ \[", p)})}
    for t, p in pieces:
        m = PHASE.match(p)
        if m:
            run.setdefault(f"phase: {re.sub(r'[0-9.]+', 'N', m.group(2)).strip()}", float(m.group(1)))
    if rc != 0:
        run["tail"] = [p for _, p in pieces[-5:]]
    return run


def missing_data_run(root: Path, timeout: float) -> dict:
    missing = Path(tempfile.gettempdir()) / "refine-ray-bench-no-such-file.parquet"
    cmd = ["bash", "scripts/train.sh", "--config", CONFIG, f"data.path={missing}",
           f"train.output_dir={Path(tempfile.mkdtemp(prefix='bench-startup-'))}/run"]
    pieces, rc, total = timed_console(cmd, root, timeout)
    return {"rc": rc, "exit": total, "error": first(pieces, re.escape(str(missing))),
            "line": next((p for _, p in pieces if str(missing) in p), None), "lines": len(pieces)}


def summary(runs: list[dict], keys: list[str], base: list[dict] | None = None) -> None:
    for k in keys:
        xs = [r[k] for r in runs if isinstance(r.get(k), (int, float))]
        bs = [r[k] for r in base or [] if isinstance(r.get(k), (int, float))]
        if xs:
            ratio = f"   x{statistics.median(xs) / statistics.median(bs):.2f} of the first root" if bs else ""
            print(f"  {k:<34} median {statistics.median(xs):6.1f} s   min {min(xs):6.1f}   max {max(xs):6.1f}"
                  f"   (n={len(xs)}){ratio}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=0, help="uncounted runs first (comm-op build, page cache)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    ap.add_argument("--root", action="append", type=Path, help="a checkout to measure (repeatable; default: this one)")
    ap.add_argument("--json", help="write every run here")
    args = ap.parse_args()
    roots = [r.resolve() for r in args.root or [ROOT]]
    for r in roots:
        if not (r / ".venv").exists():
            (r / ".venv").symlink_to(ROOT / ".venv")
    train = {str(r): [] for r in roots}
    missing = {str(r): [] for r in roots}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        for i in range(args.warmup + args.runs):
            for r in roots:
                run = train_run(r, Path(tmp) / f"run{i}-{roots.index(r)}", args.timeout)
                print(f"{r} {'warmup' if i < args.warmup else 'run'} {i}: " + json.dumps(run), flush=True)
                if i >= args.warmup:
                    train[str(r)].append(run)
    for i in range(args.runs):
        for r in roots:
            run = missing_data_run(r, args.timeout)
            print(f"{r} missing data {i}: " + json.dumps(run), flush=True)
            missing[str(r)].append(run)
    first = str(roots[0])
    for r in map(str, roots):
        print(f"\n{r}: README main job ({CONFIG}), {len(train[r])} runs, seconds since the command started:")
        phases = sorted({k for x in train[r] for k in x if k.startswith("phase: ")}, key=lambda k: train[r][0].get(k, 0))
        summary(train[r], ["first_bar", "first_step", "done", "exit"] + phases, train[first] if r != first else None)
        print(f"missing data file, {len(missing[r])} runs:  (line: {missing[r][0]['line']!r})")
        summary(missing[r], ["error", "exit"], missing[first] if r != first else None)
    if args.json:
        Path(args.json).write_text(json.dumps({"train": train, "missing_data": missing}, indent=1))
    return 0 if all(x["rc"] == 0 for runs in train.values() for x in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
