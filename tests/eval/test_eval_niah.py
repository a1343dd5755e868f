"""RULER-style NIAH generator and its scoring."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from refine_ray.eval.niah import (
    DEPTHS, ESSAY_HAYSTACK, NOISE_HAYSTACK, generate_niah, make_niah, niah_recall, score_niah,
    split_sentences,
)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
NEEDLE_RE = re.compile(r"One of the special magic numbers for (\S+) is: (\d{7})\.")
QUERY_RE = re.compile(r"What (?:are all|is) the special magic numbers? for (.+?) mentioned")


class WordTokenizer:
    """Whitespace tokenizer: one token per space-separated word."""

    def encode(self, text: str) -> list[int]:
        return [hash(w) & 0xFFFF for w in text.split()]


class CharTokenizer:
    """One token per character."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


WORDS = WordTokenizer()
MAX_SENT_WORDS = max(len(s.split()) for s in split_sentences(ESSAY_HAYSTACK))


def _context(prompt: str) -> str:
    return prompt.split("afterwards.\n", 1)[1].rsplit("\nWhat ", 1)[0]


def _recover(prompt: str) -> list[str]:
    """Answers a perfect reader would give: the values of the queried keys."""
    kv: dict[str, list[str]] = {}
    for k, v in NEEDLE_RE.findall(prompt):
        kv.setdefault(k, []).append(v)
    keys = re.split(r", and |, ", QUERY_RE.search(prompt).group(1))
    return [v for k in keys for v in kv[k]]


@pytest.mark.parametrize("variant,n_needles,n_answers", [
    ("single", 1, 1), ("multikey", 4, 1), ("multiquery", 4, 4), ("multivalue", 4, 4)])
@pytest.mark.parametrize("length", [300, 2000])
def test_length_needles_answers(variant: str, n_needles: int, n_answers: int, length: int) -> None:
    row = make_niah(variant, ESSAY_HAYSTACK, WORDS, length, seed=3)
    n = len(WORDS.encode(row["prompt"]))
    assert row["length"] == n and row["max_seq_length"] == length
    # RULER's fit: prompt + 128 generated tokens <= length, as long as possible (one sentence short)
    assert row["tokens_to_generate"] == 128
    assert length - 128 - MAX_SENT_WORDS <= n <= length - 128
    assert row["task"] == f"niah_{variant}"
    assert len(NEEDLE_RE.findall(row["prompt"])) == n_needles
    assert len(row["answers"]) == n_answers
    assert sorted(_recover(row["prompt"])) == sorted(row["answers"])
    verb = "is" if variant in ("single", "multikey") else "are"   # RULER's singular wording
    assert row["prompt"].endswith(f"mentioned in the provided text {verb}")
    assert score_niah([" ".join(row["answers"])], [row["answers"]]) == 100.0


def test_multikey_distractors_and_multivalue_same_key() -> None:
    mk = make_niah("mk", ESSAY_HAYSTACK, WORDS, 800, seed=1)
    assert len(set(mk["needle_keys"])) == 4 and mk["query_keys"][0] in mk["needle_keys"]
    mv = make_niah("mv", ESSAY_HAYSTACK, WORDS, 800, seed=1)
    assert len(set(mv["needle_keys"])) == 1 and len(set(mv["needle_values"])) == 4


@pytest.mark.parametrize("depths", [[0], [50], [100]])
def test_single_depth(depths: list[int]) -> None:
    row = make_niah("single", NOISE_HAYSTACK, WORDS, 1500, seed=0, depths=depths)
    ctx = _context(row["prompt"])
    words = ctx.split()
    pos = words.index("One") / len(words)
    # 1500 words of 3-4-word sentences: one sentence is < 1% of the context
    assert abs(pos - depths[0] / 100) < 0.02
    if depths[0] == 0:
        assert ctx.startswith("One of the special magic numbers")
    if depths[0] == 100:
        assert ctx.endswith(f"is: {row['answers'][0]}.")


def test_multi_needle_depths() -> None:
    depths = [10, 35, 60, 90]
    row = make_niah("mq", ESSAY_HAYSTACK, WORDS, 3000, seed=5, depths=depths)
    words = _context(row["prompt"]).split()
    for key, value, depth in zip(row["needle_keys"], row["needle_values"], row["needle_depths"]):
        i = words.index(value + ".")
        assert words[i - 2] == key
        assert abs(i / len(words) - depth / 100) < 0.03


def test_deterministic_and_seeded() -> None:
    a = generate_niah("mv", ESSAY_HAYSTACK, WORDS, 500, 3, seed=7)
    b = generate_niah("mv", ESSAY_HAYSTACK, WORDS, 500, 3, seed=7)
    c = generate_niah("mv", ESSAY_HAYSTACK, WORDS, 500, 3, seed=8)
    assert a == b and [r["index"] for r in a] == [0, 1, 2]
    assert a[0]["prompt"] != a[1]["prompt"] and a[0]["answers"] != c[0]["answers"]


def test_char_tokenizer_and_real_haystack() -> None:
    tok = CharTokenizer()
    row = make_niah("single", ESSAY_HAYSTACK, tok, 4000, seed=2, answer_prefix=False)
    longest = max(len(s) for s in split_sentences(ESSAY_HAYSTACK))
    assert 4000 - 128 - longest - 1 <= len(tok.encode(row["prompt"])) <= 4000 - 128
    assert row["prompt"].endswith("mentioned in the provided text?")
    path = DATA / "longbench" / "qasper_16384.parquet"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    import pyarrow.parquet as pq
    texts = pq.read_table(path, columns=["prompt"]).column("prompt").to_pylist()[:3]
    row = make_niah("mk", texts, WORDS, 3000, seed=0)
    assert row["length"] <= 3000 and sorted(_recover(row["prompt"])) == sorted(row["answers"])


def test_errors() -> None:
    with pytest.raises(ValueError, match="too short"):
        make_niah("mq", ESSAY_HAYSTACK, WORDS, 50)
    with pytest.raises(ValueError, match="unknown NIAH variant"):
        make_niah("triple", ESSAY_HAYSTACK, WORDS, 500)
    with pytest.raises(ValueError, match="need 4 integer depths"):
        make_niah("mk", ESSAY_HAYSTACK, WORDS, 500, depths=[10])
    with pytest.raises(ValueError, match="need 1 integer depths"):
        make_niah("single", ESSAY_HAYSTACK, WORDS, 500, depths=[12.5])
    with pytest.raises(ValueError, match="no text"):
        make_niah("single", "   ", WORDS, 500)


def test_recall_scoring() -> None:
    # 2 of 3 gold values present -> 2/3
    assert niah_recall("The numbers are 1234567 and 7654321.",
                       ["1234567", "7654321", "1111111"]) == pytest.approx(2 / 3)
    # (2/3 + 1) / 2 * 100 = 83.33...
    got = score_niah(["1234567 7654321", "ABC"], [["1234567", "7654321", "1111111"], ["abc"]])
    assert got == pytest.approx(250 / 3)
    assert score_niah([""], [["1234567"]]) == 0.0


# ---------------------------------------------------------------- RULER's definitions (issue 11.6)
def test_singular_wording_for_one_asked_value() -> None:
    # RULER niah.py: num_needle_q * num_needle_v == 1 -> 'Some'->'A', 'are all'->'is', 'are'->'is',
    # 'numbers'->'number' in template + answer prefix (the needles keep 'numbers')
    for variant in ("single", "multikey"):
        row = make_niah(variant, ESSAY_HAYSTACK, WORDS, 600, seed=1)
        key = row["query_keys"][0]
        assert row["prompt"].startswith("A special magic number is hidden within the following text. Make sure "
                                        "to memorize it. I will quiz you about the number afterwards.\n")
        assert row["prompt"].endswith(f"\nWhat is the special magic number for {key} mentioned in the provided "
                                      f"text? The special magic number for {key} mentioned in the provided text is")
        assert "One of the special magic numbers for" in row["prompt"]
    for variant in ("multiquery", "multivalue"):
        row = make_niah(variant, ESSAY_HAYSTACK, WORDS, 600, seed=1)
        assert row["prompt"].startswith("Some special magic numbers are hidden")
        assert "\nWhat are all the special magic numbers for " in row["prompt"]


def test_generation_budget_fits_the_nominal_length() -> None:
    for budget in (128, 0, 37):
        row = make_niah("mk", NOISE_HAYSTACK, WORDS, 1000, seed=4, tokens_to_generate=budget)
        n = len(WORDS.encode(row["prompt"]))
        # noise sentences are 3-4 words: the longest prompt with n + budget <= 1000
        assert 1000 - budget - 4 < n <= 1000 - budget and row["tokens_to_generate"] == budget
    with pytest.raises(ValueError, match="plus 128 to generate"):
        make_niah("mq", ESSAY_HAYSTACK, WORDS, 200)


def test_integer_depths_and_placement_rule() -> None:
    # np.round(np.linspace(0, 100, 40)): 100*i/39 -> 0, 2.56->3, 5.13->5, 7.69->8, ..., 51.28->51, ..., 100
    assert DEPTHS[:5] == (0, 3, 5, 8, 10) and DEPTHS[20] == 51 and DEPTHS[-1] == 100 and len(set(DEPTHS)) == 40
    rows = [make_niah("mv", ESSAY_HAYSTACK, WORDS, 900, seed=s) for s in range(5)]
    for row in rows:
        assert all(type(d) is int and d in DEPTHS for d in row["needle_depths"])
        assert row["needle_depths"] == sorted(row["needle_depths"]) and len(set(row["needle_depths"])) == 4
    # placement: needle i comes after int(k * (d_i / 100)) haystack sentences (k = haystack sentences,
    # RULER's float expression: e.g. int(100 * (29 / 100)) = 28, not 29)
    hay = [f"Filler number {i} is here." for i in range(100)]
    row = make_niah("mk", hay, WORDS, 10_000, seed=0, depths=[0, 29, 50, 100], tokens_to_generate=0)
    sents = split_sentences(_context(row["prompt"]))
    needle_at = [i for i, t in enumerate(sents) if t.startswith("One of the special magic")]
    k = len(sents) - 4
    expected = [int(k * (d / 100)) for d in (0, 29, 50, 100)]
    assert [pos - j for j, pos in enumerate(needle_at)] == expected
