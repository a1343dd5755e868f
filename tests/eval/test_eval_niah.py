"""RULER's eight NIAH tasks against RULER's rules (scripts/synthetic.yaml, data/synthetic/niah.py and
constants.py, eval/synthetic/constants.py), with the real MiniLM tokenizer and the Paul Graham essays.
Row-for-row identity with RULER's own generator: test_niah_ruler_parity.py (needs a RULER checkout)."""
from __future__ import annotations

import json
import random
import re

import pytest

from refine_ray.data import load_tokenizer
from refine_ray.eval.niah import (ANSWER_PREFIX, DEPTHS, NOISE, TASKS, TEMPLATE, check_task, generate_niah,
                                  niah_recall, string_match_all)
from refine_ray.eval.niah_sources import KeyWords, essay_text, essay_words, key_words, sent_tokenize

VALUE = {"numbers": r"\d{7}", "uuids": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
         "words": r"[A-Za-z][A-Za-z' -]*?-[A-Za-z][A-Za-z' -]*?"}
LENGTH = 2048


class _Tok:
    """Token counts as ``refine-ray eval`` takes them: the MiniLM tokenizer, no special tokens."""

    def __init__(self):
        self.tok = load_tokenizer(None)
        self.tok.model_max_length = 1 << 30

    def encode(self, text):
        return self.tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def tok():
    return _Tok()


@pytest.fixture(scope="module")
def rows(tok):
    return {name: generate_niah(name, tok, LENGTH, 4) for name in TASKS}


def _needle_re(task):
    t = TASKS[task]
    return re.compile(rf"One of the special magic {t.value_type} for ({VALUE[t.key_type]}) is: ({VALUE[t.value_type]})\.")


def _context(row):
    return row["prompt"].split("afterwards.\n", 1)[1].rsplit("\nWhat ", 1)[0]


@pytest.mark.parametrize("task", list(TASKS))
def test_template_needles_answers_and_length(rows, tok, task):
    t = TASKS[task]
    singular = t.num_queries * t.num_values == 1   # RULER: 'Some'->'A', 'are all'->'is', 'are'->'is', type[:-1]
    word = t.value_type[:-1] if singular else t.value_type
    for row in rows[task]:
        p = row["prompt"]
        head = (f"A special magic {word} is hidden" if singular else f"Some special magic {word} are hidden")
        assert p.startswith(head + f" within the following text. Make sure to memorize it. I will quiz you about "
                                   f"the {word} afterwards.\n")
        ask = "is" if singular else "are all"
        m = re.search(rf"\nWhat {ask} the special magic {word} for (.+) mentioned in the provided text\? The special "
                      rf"magic {word} for (.+) mentioned in the provided text {'is' if singular else 'are'}$", p)
        assert m and m[1] == m[2], p[-300:]
        # RULER's input / answer_prefix split at the answer prefix's first 10 characters
        assert row["input"] + row["answer_prefix"] == p and row["answer_prefix"].startswith(ANSWER_PREFIX[:10])
        # the needles: keys and values of the task's types; a reader who finds them all answers exactly
        found = _needle_re(task).findall(_context(row))
        queried = re.split(r", and |, ", m[1])
        assert len(queried) == t.num_queries and len(row["answers"]) == t.num_queries * t.num_values
        values = {}
        for k, v in found:
            values.setdefault(k, []).append(v)
        assert sorted(v for k in queried for v in values[k]) == sorted(row["answers"])   # needles are shuffled
        needles = max(t.num_keys, t.num_queries) * t.num_values
        assert len(found) == (needles + row["num_haystack"] if t.haystack == "needle" else needles)
        # RULER's length: prompt tokens + tokens_to_generate, within max_seq_length
        assert row["length"] == len(tok.encode(p)) + 128 <= LENGTH and row["tokens_to_generate"] == 128


@pytest.mark.parametrize("task", [n for n, t in TASKS.items() if t.haystack != "essay"])
def test_noise_and_needle_haystacks_are_lines(rows, task):
    """Noise / needle haystacks: RULER's lines joined by '\\n', needles inserted as lines of their own."""
    t = TASKS[task]
    for row in rows[task]:
        lines = _context(row).split("\n")
        needles = max(t.num_keys, t.num_queries) * t.num_values
        assert len(lines) == row["num_haystack"] + needles
        if t.haystack == "noise":
            assert sum(line == NOISE for line in lines) == row["num_haystack"]
        else:
            assert all(_needle_re(task).fullmatch(line) for line in lines)


def _segments(task, context):
    """The essay pieces between needles, checking RULER's separators: seg0 ' ' n1 ' ' seg1 ... nK ' ' segK."""
    pieces = _needle_re(task).split(context)[::3]   # split keeps the two groups: text, key, value, text, ...
    assert pieces[0].endswith(" ") and pieces[-1].startswith(" ")
    assert all(p.startswith(" ") and p.endswith(" ") for p in pieces[1:-1])
    return [pieces[0][:-1]] + [p[1:-1] for p in pieces[1:-1]] + [pieces[-1][1:]]


@pytest.mark.parametrize("task", [n for n, t in TASKS.items() if t.haystack == "essay"])
def test_essay_whitespace_and_depths_are_rulers(tok, task):
    """Essay: the first N words of the essays split into sentences by Punkt; needle i before sentence
    int(n * depth_i / 100) of RULER's depths; segments joined by ' ' keeping empty ones (a needle at depth 0
    leaves a leading space, at 100 a trailing one, two at one position a double space): RULER's joining."""
    t = TASKS[task]
    rows = generate_niah(task, tok, 1200, 12, seed=3)
    empty = 0
    for row in rows:
        ctx = _context(row)
        segs = _segments(task, ctx)
        sents = sent_tokenize(" ".join(essay_words()[:row["num_haystack"]]).strip())
        cuts, i = [0], 0
        for seg in segs:   # each segment is the next run of whole sentences joined by ' '
            j = i
            while j < len(sents) and len(" ".join(sents[i:j])) < len(seg):
                j += 1
            assert seg == " ".join(sents[i:j])
            cuts.append(i := j)
        assert i == len(sents)
        assert set(cuts[1:-1]) <= {int(len(sents) * (d / 100)) for d in DEPTHS}
        empty += segs.count("")
        assert ctx.startswith(" ") == (segs[0] == "") and ctx.endswith(" ") == (segs[-1] == "")
    if max(t.num_keys, t.num_queries) * t.num_values > 1:   # four needles: some rows show RULER's spaces
        assert empty > 0


def test_seeded_prefix_and_limit(tok):
    a = generate_niah("niah_multivalue", tok, 1500, 3, seed=7)
    assert a == generate_niah("niah_multivalue", tok, 1500, 3, seed=7)
    assert a[:2] == generate_niah("niah_multivalue", tok, 1500, 2, seed=7)   # --limit: a prefix of the rows
    assert a[0]["answers"] != generate_niah("niah_multivalue", tok, 1500, 1, seed=8)[0]["answers"]
    assert [r["index"] for r in a] == [0, 1, 2] and len({r["prompt"] for r in a}) == 3


def test_bad_names_and_lengths(tok):
    with pytest.raises(ValueError, match="'multikey' is now niah_multikey_1; RULER's tasks: niah_single_1"):
        check_task("multikey")
    with pytest.raises(ValueError, match="unknown NIAH task 'triple'"):
        check_task("triple")
    with pytest.raises(ValueError, match=r"niah_single_2: length 700 is too short: RULER's smallest haystack "
                                         r"\(500 words\) gives \d+ prompt tokens \+ 128 to generate"):
        generate_niah("niah_single_2", tok, 700, 1)
    with pytest.raises(ValueError, match="need max_seq_length > 0"):
        generate_niah("niah_single_1", tok, 2048, 0)


def test_string_match_all_is_rulers():
    # RULER: sum(sum(r.lower() in pred.lower()) / len(ref)) / len(preds) * 100, round(., 2), on
    # postprocess_pred output (strip, control characters -> '\n')
    assert niah_recall("The numbers are 1234567 and 7654321.", ["1234567", "7654321", "1111111"]) == 2 / 3
    assert string_match_all(["1234567 7654321", "ABC-def"], [["1234567", "7654321", "1111111"], ["abc-DEF"]]) == 83.33
    assert string_match_all(["\t 1234567\x00"], [["1234567"]]) == 100.0
    assert string_match_all([""], [["1234567"]]) == 0.0
    with pytest.raises(ValueError, match="1 predictions vs 2 answer lists"):
        string_match_all(["x"], [["a"], ["b"]])


def test_key_words_match_rulers_sorted_set():
    """KeyWords indexes sorted(set(f'{adj}-{noun}')) exactly, also where hyphens, spaces, case and prefixes
    make adjectives interleave or collide; random.choice draws what it draws from the built list."""
    adjs = ["high", "high-pitched", "highfalutin", "teeny", "teeny-tiny", "Early", "ad hoc", "ad", "red", "red",
            "x-rated", "old", "old-fashioned"]
    nouns = ["tiny-cat", "cat", "back-up", "TV", "contact lens", "fashioned-x", "pitched-a"]
    built = sorted({f"{a}-{n}" for a in adjs for n in nouns})
    kw = KeyWords(adjs, nouns)
    assert len(kw) == len(built) and list(kw) == built and kw[-1] == built[-1] and kw[2:5] == built[2:5]
    assert random.Random(5).choice(kw) == random.Random(5).choice(built)
    real = key_words()
    assert len(real) == 6_171_620 and real[0] == "Early-ATM"   # wonderwords 3.0.1: 910 adjectives x 6782 nouns


@pytest.mark.slow
def test_key_words_equal_the_built_list_on_wonderwords():
    from wonderwords.random_word import _get_words_from_text_file as words

    built = sorted(set(f"{a}-{n}" for a in words("adjectivelist.txt") for n in words("nounlist.txt")))
    assert list(key_words()) == built


def test_essays_are_rulers_and_other_sources(tmp_path):
    words = essay_words()
    assert len(words) == 111_877 and words[:3] == ("July", "2010What", "hard")   # essays glued as RULER's text +=
    (tmp_path / "PaulGrahamEssays.json").write_text(json.dumps({"text": essay_text()}))
    assert essay_words(str(tmp_path / "PaulGrahamEssays.json")) == words
    (tmp_path / "essays").mkdir()
    (tmp_path / "essays" / "b.txt").write_text("second. ")
    (tmp_path / "essays" / "a.txt").write_text("First one.\n")
    assert essay_text(str(tmp_path / "essays")) == "First one.\nsecond. "   # sorted by name, nothing between
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(ValueError, match="is not RULER's PaulGrahamEssays.json"):
        essay_text(str(tmp_path / "bad.json"))


def test_template_is_rulers_constants():
    # RULER constants.py TASKS['niah'] (template + answer prefix), needle and depths
    assert TEMPLATE.endswith("What are all the special magic {type_needle_v} for {query} mentioned in the "
                             "provided text?") and "\n{context}\n" in TEMPLATE
    assert ANSWER_PREFIX == " The special magic {type_needle_v} for {query} mentioned in the provided text are"
    assert DEPTHS[:5] == (0, 3, 5, 8, 10) and DEPTHS[20] == 51 and DEPTHS[-1] == 100 and len(set(DEPTHS)) == 40
