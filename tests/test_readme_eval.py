"""README.md's test-time-training, export -> eval -> tables commands, taken from README.md itself and run
as written (issue 20 point 1), so the test fails when the README and the code drift apart.

They run from a scratch folder laid out like the repository (``configs/`` and ``../shared`` linked),
in-process through the same entry points as ``.venv/bin/refine-ray`` and ``python -m
refine_ray.eval.tables``, with the shell's ``results/*.json`` glob expanded here. Two deliberate
changes keep the test fast: ``--limit`` shrinks to 2 (TTT: 1), and the export reads ``tiny:delta_net``
instead of the main job's run directory (training it takes minutes; tests/test_train*.py cover that).
"""
from __future__ import annotations

import glob
import json
import re
import shlex
from pathlib import Path

from refine_ray.cli import main as refine_ray
from refine_ray.eval import tables

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[list[str]]:
    """The README's TTT row and the commands of its 'Evaluation, export, result tables' block, in order."""
    text = (ROOT / "README.md").read_text()
    ttt = re.findall(r"`(\.venv/bin/refine-ray eval --config configs/ttt_tiny_longbench\.yaml[^`]*)`", text)
    block = text.split("### Evaluation, export, result tables", 1)[1].split("\n#", 1)[0]
    joined = re.sub(r"\\\n\s*", " ", block)                 # shell line continuations
    lines = [line.strip() for line in joined.splitlines() if line.startswith("    .venv/bin/")]
    return [shlex.split(c) for c in ttt + lines]


def test_readme_commands_are_found():
    cmds = readme_commands()
    assert [c[:2] for c in cmds] == [[".venv/bin/refine-ray", "eval"], [".venv/bin/refine-ray", "export"],
                                     [".venv/bin/refine-ray", "eval"], [".venv/bin/python", "-m"]]
    assert cmds[-1][2] == "refine_ray.eval.tables"


def _limit(args: list[str], n: int) -> list[str]:
    i = args.index("--limit")
    return args[:i + 1] + [str(n)] + args[i + 2:]


def test_readme_ttt_export_eval_tables(shared_data, tmp_path, monkeypatch, capsys):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "shared").symlink_to(shared_data.parent)
    monkeypatch.chdir(repo)
    ttt, export, ev, tab = readme_commands()

    assert refine_ray([*_limit(ttt[1:], 1), "--no-progress"]) == 0
    i = export.index("--from")
    assert refine_ray([*export[1:i + 1], "tiny:delta_net", *export[i + 2:]]) == 0
    assert refine_ray([*_limit(ev[1:], 2), "--no-progress"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    run = Path(export[export.index("--out") + 1]).parent.name            # outputs/<run>/hf -> <run>
    assert out[-1].startswith(f"{run}-ttt_none: qasper=") and " | means: longbench[thudm]=" in out[-1]
    assert "niah/string_match_all=" in out[-1] and out[-1].endswith(f"-> results/{run}-ttt_none.json")
    result = json.loads(Path(f"results/{run}-ttt_none.json").read_text())
    assert result["meta"]["sets"]["niah_multikey_1_4096"]["rows"] == 2

    args = tab[3:]
    star = args.index("results/*.json")
    args[star:star + 1] = sorted(glob.glob("results/*.json"))           # as the shell expands it
    assert any(a.endswith(".settings.json") for a in args)              # eval's sidecars are in the glob
    assert tables.main(args) == 0
    md = Path(args[args.index("--out") + 1]).read_text()
    assert f"| {run}-ttt_none | thudm |" in md and "| tiny_delta_net-ttt_refine | thudm |" in md
    assert "niah_multikey_1 4K" in md and "squadqa 4K" in md
    assert Path(args[args.index("--plot") + 1]).read_bytes()[:4] == b"\x89PNG"
