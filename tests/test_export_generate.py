"""Exports generate text (issue 20 point 11): transformers' ``AutoModelForCausalLM`` + ``generate`` on CPU
for every family we export, and ``refine-ray generate``, token for token against our cached-state engine;
left-padded prompts of different lengths as the engine's unpadded rows (LaCT: refused in one line).

Transformers runs in a fresh interpreter, as a user's script would: ``import refine_ray.models.auto``
replaces fla's Auto registration process-wide, which other tests of this session rely on.
"""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from refine_ray.cli import main
from refine_ray.export import export_model
from refine_ray.models import registry
from refine_ray.models.generation import generate

NEW = 24                       # crosses LaCT's 16-token chunks and window during decoding
PROMPTS = [[101, 2023, 2003, 1037, 3231, 1997, 1996, 4654, 6442, 2005, 1996, 2034, 2051, 1012, 2009, 2001,
            1037, 2204, 2154, 1998, 102],
           [7592, 2088, 2003, 2307, 2000, 2022, 2182, 2006, 2023, 3376, 2154, 1010, 2057, 2024, 2183, 2000,
            4521, 1999, 1996, 2380, 1012]]

TRANSFORMERS_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    import refine_ray.models.auto  # noqa: F401  our classes for every exported family
    from transformers import AutoModelForCausalLM
    dirs, prompts, new = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2])), int(sys.argv[3])
    out = {}
    for kind, d in dirs.items():
        model = AutoModelForCausalLM.from_pretrained(d).eval()
        mask = torch.ones_like(prompts)
        rows = model.generate(prompts, attention_mask=mask, max_new_tokens=new, do_sample=False)[:, prompts.shape[1]:]
        no_cache = model.generate(prompts, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=False)
        # left padding, as a tokenizer pads prompts of different lengths: row 1 loses its first 5 tokens
        padded, mask = prompts.clone(), torch.ones_like(prompts)
        padded[1, :5], mask[1, :5] = 0, 0
        try:
            rows_padded = model.generate(padded, attention_mask=mask, max_new_tokens=new,
                                         do_sample=False)[:, prompts.shape[1]:].tolist()
        except ValueError as e:
            rows_padded = str(e)
        out[kind] = {"class": type(model).__module__ + "." + type(model).__name__, "rows": rows.tolist(),
                     "same_without_cache": torch.equal(no_cache[:, prompts.shape[1]:], rows[:, :6]),
                     "eos": model.generation_config.eos_token_id, "padded": rows_padded}
    print(json.dumps(out))
""")


def _until_eos(row: list[int], eos) -> list[int]:
    """transformers' row up to (without) its first EOS; the rest is padding after the stop."""
    stops = {eos} if isinstance(eos, int) else set(eos or ())
    return next((row[:i] for i, t in enumerate(row) if t in stops), row)


def test_every_exported_family_generates_with_transformers_as_our_engine(tmp_path):
    dirs = {}
    for kind in registry.MODEL_TYPES:
        dirs[kind] = str(tmp_path / kind)
        export_model(f"tiny:{kind}", dirs[kind])
    proc = subprocess.run([sys.executable, "-c", TRANSFORMERS_SCRIPT, json.dumps(dirs), json.dumps(PROMPTS), str(NEW)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for kind, d in dirs.items():
        r = got[kind]
        ours = registry.load_model(d).eval()
        native = registry.family(kind).classes().config.__module__.startswith("transformers.")
        assert r["class"] == ("transformers.models.llama.modeling_llama.LlamaForCausalLM" if native else
                              f"{type(ours).__module__}.{type(ours).__name__}"), kind
        reference = generate(ours, torch.tensor(PROMPTS), NEW, eos_token_id=r["eos"])   # greedy, stops at EOS
        for row, ref in zip(r["rows"], reference):
            assert _until_eos(row, r["eos"]) == ref.tolist(), kind
        assert r["same_without_cache"], kind
        if registry.family(kind).offset_free_state or native:      # padded rows run unpadded
            unpadded = generate(ours, [torch.tensor(PROMPTS[0]), torch.tensor(PROMPTS[1][5:])], NEW,
                                eos_token_id=r["eos"])
            for row, ref in zip(r["padded"], unpadded):
                assert _until_eos(row, r["eos"]) == ref.tolist(), kind
        else:                                                       # LaCT: one length per call
            assert "prompts of different lengths cannot share one generate() call" in r["padded"], kind


def test_refine_ray_generate_command(tmp_path, tokenizer, capsys):
    out = tmp_path / "hf"
    export_model("tiny:lact", out)
    prompt = "the quick brown fox jumps over the lazy dog because it wants to see the river"
    assert main(["generate", "--model", str(out), "--prompt", prompt, "--prompt", "hello", "--max-new-tokens", "20"]) == 0
    printed = capsys.readouterr().out
    model = registry.load_model(str(out)).eval()
    for text in (prompt, "hello"):
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
        ref = generate(model, ids, 20, eos_token_id=model.generation_config.eos_token_id)
        assert f">>> {text}\n{tokenizer.decode(ref.tolist(), skip_special_tokens=True)}\n" in printed
    for args, needle in ((["--model", str(tmp_path / "nope"), "--prompt", "x"], "not a local HF model directory"),
                         (["--model", str(out), "--prompt", "x", "--max-new-tokens", "0"], "expected an integer >= 1"),
                         (["--model", str(out)], "give at least one prompt")):
        assert main(["generate", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err


@pytest.mark.parametrize("kind", ["delta_net", "lact"])
def test_generate_in_process_beam_search_and_sampling_run(kind, tokenizer):
    """What transformers' generate asks of the cache beyond greedy: beam search reorders it, sampling
    expands rows; both finish with the requested length."""
    model = registry.build_model(kind, seed=0, vocab_size=len(tokenizer)).eval()
    prompts = torch.tensor(PROMPTS)
    beams = model.generate(prompts, max_new_tokens=6, num_beams=3, do_sample=False, min_new_tokens=6)
    sampled = model.generate(prompts, max_new_tokens=6, do_sample=True, num_return_sequences=2, min_new_tokens=6)
    assert beams.shape == (2, prompts.shape[1] + 6) and sampled.shape == (4, prompts.shape[1] + 6)
    assert torch.equal(beams[:, :prompts.shape[1]], prompts)


def test_readme_python_example_batches_prompts_with_the_exported_tokenizer(tmp_path):
    """The README's Python example (under "Text from an export") run as written on an export: the
    exported tokenizer pads on the left and returns no token_type_ids (the MiniLM tokenizer padded right
    and returned them, which generate() refused: "model_kwargs are not used ... ['token_type_ids']"),
    and each row of the padded batch continues its prompt as that prompt alone does (greedy)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("In Python, every family", 1)[1].split("\nLeft-padded prompts", 1)[0]
    code = "\n".join(line[4:] for line in section.splitlines() if line.startswith("    "))
    assert "padding=True" in code and "**batch" in code
    out = tmp_path / "hf"
    export_model("tiny:delta_net", out)
    check = textwrap.dedent("""
        import json
        new = batch.input_ids.shape[1]
        rows = model.generate(**batch, max_new_tokens=20, do_sample=False)[:, new:].tolist()
        alone = []
        for p in prompts:
            one = tok(p, return_tensors="pt", add_special_tokens=False)
            alone.append(model.generate(**one, max_new_tokens=20, do_sample=False)[0, one.input_ids.shape[1]:].tolist())
        print(json.dumps({"rows": rows, "alone": alone, "side": tok.padding_side, "keys": sorted(batch),
                          "left_padded": bool((batch.attention_mask[:, 0] == 0).any()),
                          "eos": model.generation_config.eos_token_id}))
    """)
    script = re.sub(r'"outputs/tiny-deltanet-mid/hf"', repr(str(out)), code) + "\n" + check
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["side"] == "left" and got["keys"] == ["attention_mask", "input_ids"] and got["left_padded"]
    for row, alone in zip(got["rows"], got["alone"]):
        assert _until_eos(row, got["eos"]) == _until_eos(alone, got["eos"])
