"""Data at corpus scale: start-up time and peak memory of the driver and a scorer, by corpus size.

For each corpus size it generates a parquet corpus of ``--docs`` documents of ``--tokens``
tokens (words drawn uniformly from the tokenizer's whole-word vocabulary: lower-case
alphabetic entries, one token each, joined by spaces; written in row groups of 64
documents under ``--work``), then runs, each in a FRESH process (5 repeats by default):

* ``first``: the driver's data work at a first start, with an empty datasets cache:
  :func:`refine_ray.preflight.check_data` (the corpus converted into datasets' Arrow
  cache, the token-count index built with ``data.num_proc`` processes and cached, the
  cursor rule checked);
* ``second``: the same call at a second start (cache in place);
* ``scorer``: a scorer at a second start: :class:`roles.scorer.ScorerRole` built (tokenizer,
  memory-mapped corpus, tiny DeltaNet of configs/tiny_deltanet_mid.yaml) and the rows of
  its first request read and tokenised (2 documents, rows 3 and the last); then that
  request scored (``score_rows``, documents truncated to ``--score-length``: model compute,
  reported apart);
* ``baseline`` (``--baseline-rev``, corpora up to ``--baseline-max-docs``): the driver's data
  work of the code before this change (``refine_ray/data.py`` of that git revision, loaded
  from git) at a second start (its datasets conversion in place, in a cache of its own): read
  every text, check them, tokenise the corpus in one call. That code did this at every start.

Times are seconds of the phase inside the process (imports and tokenizer loading excluded,
reported apart as ``startup``); memory is the process's peak RSS (``getrusage``,
``ru_maxrss``) and, for the first start, the largest map worker's (``RUSAGE_CHILDREN``).
A full Ray run is not timed here (``scripts/bench_startup.py`` times start-up of the main
job); these phases are the part of it that grows with the corpus. Runs are appended to
``--work/results.json`` and the table covers all of them, so a long series can be split
over several commands (``--phases first --repeats 1``, five times).

    nice -n 10 .venv/bin/python scripts/bench_data.py --docs 200 5000 --repeats 5 --num-proc 2
"""
from __future__ import annotations

import argparse
import json
import operator
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_deltanet_mid.yaml"


def generate(path: Path, docs: int, tokens: int, seed: int = 0) -> None:
    """``docs`` documents of ``tokens`` whole-word vocabulary entries each, as parquet (row groups of 64)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from refine_ray.data import load_tokenizer

    tok = load_tokenizer()
    words = sorted(w for w in tok.get_vocab() if w.isascii() and w.isalpha() and w.islower())
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, pa.schema([("text", pa.string())])) as writer:
        for start in range(0, docs, 64):
            texts = [" ".join(operator.itemgetter(*rng.integers(0, len(words), tokens).tolist())(words))
                     for _ in range(min(64, docs - start))]
            writer.write_table(pa.table({"text": texts}))
    tmp.rename(path)


def _config(corpus: Path, args):
    from refine_ray.config import load_config

    return load_config(str(CONFIG), [f"data.path={corpus}", "data.text_column=text",
                                     f"data.max_length={args.max_length}", f"data.num_proc={args.num_proc}",
                                     "data.batch_size=2"])


def phase(args) -> dict:
    """Run one phase in this (fresh) process; returns its measurements."""
    t0 = time.perf_counter()
    import datasets  # noqa: F401  (imported lazily by the data code: here, so that the phases exclude it)

    from refine_ray.data import load_tokenizer
    from refine_ray.preflight import check_data
    from refine_ray.refine.scoring import min_document_tokens

    cfg = _config(Path(args.corpus), args)
    tok = load_tokenizer(cfg.tokenizer.path)
    need = max(min_document_tokens(cfg.refine), cfg.data.min_length)
    t1 = time.perf_counter()
    out = {"startup_s": t1 - t0, "start_rss_mib": _peak_rss()}
    sampler = MemorySampler()
    sampler.start()
    if args.phase in ("first", "second"):
        rows, usable, lengths = check_data(cfg, tok, need)
        out.update(rows=rows, tokens=int(lengths.sum()))
    elif args.phase == "scorer":
        from roles.scorer import ScorerRole

        scorer = ScorerRole(model=cfg.model, tokenizer=cfg.tokenizer, data=cfg.data, refine=cfg.refine, system=cfg.system,
                            run_seed=cfg.train.seed)
        out["built_s"] = time.perf_counter() - t1
        rows = [3, len(scorer.corpus) - 1]
        t2 = time.perf_counter()
        docs = [scorer.corpus.document(r) for r in rows]          # what score_rows reads first
        out["read_s"] = time.perf_counter() - t2
        out["read_rss_mib"] = _peak_rss()
        t2 = time.perf_counter()
        scored = scorer.score_rows(rows, step=0)
        out.update(score_s=time.perf_counter() - t2, tokens=len(scored.docs.tokens))
        assert len(scored.docs.tokens) == sum(len(d.ids) for d in docs)
    else:                       # the code before this change, loaded from git
        import importlib.util

        src = Path(args.work) / f"data_{args.baseline_rev}.py"
        src.write_text(subprocess.run(["git", "show", f"{args.baseline_rev}:refine_ray/data.py"], cwd=ROOT,
                                      capture_output=True, text=True, check=True).stdout)
        spec = importlib.util.spec_from_file_location("old_data", src)
        old = sys.modules["old_data"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        t1 = time.perf_counter()
        corpus = old.Corpus(cfg.data, tok)                     # its preflight.check_data, data part
        assert any(t.strip() for t in corpus.texts)
        out.update(rows=len(corpus), tokens=int(corpus.lengths().sum()))
    out["phase_s"] = time.perf_counter() - t1
    sampler.done.set()
    sampler.join()
    out.update(sampler.peaks, rss_mib=_peak_rss(),
               children_rss_mib=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    return out


def _peak_rss() -> float:
    """This process's peak resident set so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MemorySampler(threading.Thread):
    """Peak resident memory by kind (MiB), sampled every 0.1 s from /proc: this process's anonymous
    (``RssAnon``) and file-backed (``RssFile``) pages, and for its largest child (a map worker)
    the private dirty pages it made itself (``Private_Dirty``: a forked worker's ``RssAnon`` also
    counts the pages it shares with the driver) and its file-backed pages. ``ru_maxrss`` adds all
    kinds; file-backed pages of the memory-mapped Arrow files a process has read are page cache
    that the kernel reclaims under pressure, the other kinds are memory in use."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peaks = {"anon_mib": 0.0, "file_mib": 0.0, "child_private_mib": 0.0, "child_file_mib": 0.0}
        self.done = threading.Event()

    @staticmethod
    def _fields(path: str) -> dict[str, float]:
        try:
            text = Path(path).read_text()
        except OSError:                   # a worker that just ended
            return {}
        pairs = (line.split(":", 1) for line in text.splitlines() if line.endswith(" kB"))
        return {k: int(v.split()[0]) / 1024 for k, v in pairs}

    def _children(self) -> list[int]:
        out = []
        for task in Path("/proc/self/task").iterdir():
            try:
                out += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        return out

    def run(self) -> None:
        p = self.peaks
        while not self.done.wait(0.1):
            own = self._fields("/proc/self/status")
            p["anon_mib"] = max(p["anon_mib"], own.get("RssAnon", 0.0))
            p["file_mib"] = max(p["file_mib"], own.get("RssFile", 0.0))
            for child in self._children():
                rollup, status = self._fields(f"/proc/{child}/smaps_rollup"), self._fields(f"/proc/{child}/status")
                p["child_private_mib"] = max(p["child_private_mib"], rollup.get("Private_Dirty", 0.0))
                p["child_file_mib"] = max(p["child_file_mib"], status.get("RssFile", 0.0))


def run_phase(name: str, corpus: Path, cache: Path, args) -> dict:
    env = dict(os.environ, HF_DATASETS_CACHE=str(cache))
    cmd = [sys.executable, __file__, "--phase", name, "--corpus", str(corpus), "--work", str(args.work),
           "--num-proc", str(args.num_proc), "--max-length", str(args.max_length if name != "scorer" else
                                                                  args.score_length),
           "--baseline-rev", args.baseline_rev or ""]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode:
        raise SystemExit(f"bench_data: phase {name} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def summary(values: list[float], digits: int) -> str:
    """``median [min-max]``."""
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def table(results: dict, corpora: dict) -> str:
    """The markdown table of every run in ``results`` (``{docs: {phase: [runs]}}``): times as
    ``median [min-max]`` seconds, memory as medians in MiB."""
    head = ["documents", "tokens", "parquet / Arrow cache MiB", "first start: check_data s",
            "first start: driver peak RSS (anonymous) MiB", "first start: map worker private / file-backed MiB",
            "second start: check_data s", "second start: driver peak RSS (anonymous) MiB",
            "scorer: built s (model included)", "scorer: 2 rows read s", "scorer: peak RSS after reading MiB",
            "scorer: first request scored s", "before: check_data s (every start)",
            "before: driver peak RSS (anonymous) MiB", "runs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for docs, res in sorted(results.items(), key=lambda kv: int(kv[0])):
        def med(name: str, key: str) -> str:
            runs = [x[key] for x in res.get(name, []) if key in x]
            return f"{statistics.median(runs):.0f}" if runs else "-"

        def times(name: str, key: str) -> str:
            runs = res.get(name, [])
            return summary([x[key] for x in runs], 2) if runs else "not run"

        c = corpora[docs]
        cells = [f"{int(docs):,}", f"{c['tokens'] / 1e6:.1f} M", f"{c['parquet_mib']:.0f} / {c['cache_mib']:.0f}",
                 times("first", "phase_s"), f"{med('first', 'rss_mib')} ({med('first', 'anon_mib')})",
                 f"{med('first', 'child_private_mib')} / {med('first', 'child_file_mib')}",
                 times("second", "phase_s"), f"{med('second', 'rss_mib')} ({med('second', 'anon_mib')})",
                 times("scorer", "built_s"), times("scorer", "read_s"), med("scorer", "read_rss_mib"),
                 times("scorer", "score_s"), times("baseline", "phase_s"),
                 f"{med('baseline', 'rss_mib')} ({med('baseline', 'anon_mib')})",
                 ", ".join(f"{k} {len(v)}" for k, v in res.items() if v)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--docs", type=int, nargs="+", default=[200, 5000])
    p.add_argument("--tokens", type=int, default=16384, help="tokens per generated document")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--phases", nargs="+", default=["first", "second", "scorer", "baseline"],
                   help="runs are appended to --work/results.json, so long series can be split over commands")
    p.add_argument("--num-proc", type=int, default=2, help="data.num_proc")
    p.add_argument("--max-length", type=int, default=16384, help="data.max_length of the driver")
    p.add_argument("--score-length", type=int, default=512, help="data.max_length of the scorer: the tokens it "
                   "scores per document (it still reads and tokenises the whole document)")
    p.add_argument("--work", default=str(ROOT / ".cache" / "bench_data"))
    p.add_argument("--baseline-rev", default="7ea6db5", help="git revision of the code before (empty: skip)")
    p.add_argument("--baseline-max-docs", type=int, default=200, help="its one-call tokenisation holds every "
                   "token id as a Python int: larger corpora need tens of GiB")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.work = Path(args.work)
    if args.phase:
        print(json.dumps(phase(args)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    store = args.work / "results.json"
    saved = json.loads(store.read_text()) if store.exists() else {"results": {}, "corpora": {}}
    for docs in args.docs:
        corpus = args.work / f"corpus_{docs}x{args.tokens}.parquet"
        if not corpus.exists():
            print(f"generating {corpus} ...", flush=True)
            generate(corpus, docs, args.tokens)
        cache = args.work / f"hf_datasets_{docs}"
        res = saved["results"].setdefault(str(docs), {})
        phases = [n for n in args.phases if n != "baseline" or (args.baseline_rev and docs <= args.baseline_max_docs)]
        before = args.work / f"hf_datasets_before_{docs}"      # the old code's own conversion, kept
        if "baseline" in phases and not before.exists():
            run_phase("baseline", corpus, before, args)      # untimed: its conversion, as at its 2nd start
        # phases interleaved repeat by repeat, so that a change of machine load hits all of them alike
        for _ in range(args.repeats):
            for name in phases:
                if name == "first":
                    shutil.rmtree(cache, ignore_errors=True)
                res.setdefault(name, []).append(run_phase(name, corpus, before if name == "baseline" else cache,
                                                          args))
                if name == "first":       # what a first start leaves in the cache (the baseline adds its own)
                    res["first"][-1]["cache_mib"] = sum(f.stat().st_size for f in cache.rglob("*")
                                                        if f.is_file()) / 2 ** 20
                print(f"{docs} documents, {name} #{len(res[name])}: {res[name][-1]}", flush=True)
                store.write_text(json.dumps(saved, indent=1))
        tokens = next((x["tokens"] for x in res.get("first", []) + res.get("second", [])), 0)
        saved["corpora"][str(docs)] = {"tokens": tokens, "parquet_mib": corpus.stat().st_size / 2 ** 20,
                                       "cache_mib": next((x["cache_mib"] for x in res.get("first", [])), 0)}
        store.write_text(json.dumps(saved, indent=1))
    print(table(saved["results"], saved["corpora"]))
    print(f"\nmedian [min-max] over fresh processes; data.num_proc={args.num_proc}, data.max_length="
          f"{args.max_length} (scorer: {args.score_length}); CPUs: {len(os.sched_getaffinity(0))}; "
          f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
