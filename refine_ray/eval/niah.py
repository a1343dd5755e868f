"""RULER-style needle-in-a-haystack (NIAH) prompts and scoring.

Follows RULER's ``scripts/data/synthetic/niah.py`` and its ``constants.py`` template wherever
they define something:

* variants (keys / values per key / queried keys): single (S-NIAH) 1/1/1, multikey (MK)
  4/1/1, multiquery (MQ) 4/1/4, multivalue (MV) 1/4/1; needles read "One of the special
  magic numbers for {key} is: {value}." with 7-digit values and adjective-noun keys;
* RULER's NIAH template and answer prefix, in the singular when one value is asked for
  (queried keys x values per key == 1, i.e. single and multikey: "A special magic number
  is hidden ... What is the special magic number for ... are" -> "is");
* the prompt plus the generation budget (``tokens_to_generate``, RULER's 128 by default)
  fit the nominal ``length``: the largest haystack with ``len(prompt) + budget <= length``;
* integer needle depths sampled without replacement from RULER's 40 depths
  ``round(linspace(0, 100, 40))``; needle i (after a shuffle) goes before haystack sentence
  ``int(n_sentences * depth_i / 100)`` of the sorted depths (RULER's essay placement rule).

Deliberate differences: the haystack is our own text (``ESSAY_HAYSTACK``, or any texts
passed in), cycled by whole sentences from a seeded start, instead of the Paul Graham
essays cut by words; the fit searches whole sentences; keys are drawn from our own
adjective/noun lists without repeats; nothing is downloaded. Everything is deterministic
given ``seed``.
"""
from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from refine_ray.eval.metrics import check_predictions

__all__ = [
    "Tokenizer", "VARIANTS", "NEEDLE", "DEPTHS", "TOKENS_TO_GENERATE", "NOISE_HAYSTACK", "ESSAY_HAYSTACK", "split_sentences",
    "make_niah", "generate_niah", "niah_recall", "score_niah",
]


class Tokenizer(Protocol):
    """What NIAH generation needs of a tokenizer: ``encode(text) -> token ids`` (to size haystacks in tokens)."""
    def encode(self, text: str) -> Sequence[int]: ...


# variant -> (num_keys, num_values per key, num_queried keys)
VARIANTS: dict[str, tuple[int, int, int]] = {
    "single": (1, 1, 1), "multikey": (4, 1, 1), "multiquery": (4, 1, 4), "multivalue": (1, 4, 1),
}
_ALIASES = {"s": "single", "s-niah": "single", "mk": "multikey", "mk-niah": "multikey",
            "mq": "multiquery", "mq-niah": "multiquery", "mv": "multivalue", "mv-niah": "multivalue"}

NEEDLE = "One of the special magic numbers for {key} is: {value}."
TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to "
            "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
            "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?")
ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
# RULER's depths: np.round(np.linspace(0, 100, 40)).astype(int) (no .5 ties, so round() agrees)
DEPTHS: tuple[int, ...] = tuple(round(100 * i / 39) for i in range(40))
TOKENS_TO_GENERATE = 128  # RULER's NIAH generation budget


def _template(singular: bool, answer_prefix: bool) -> tuple[str, str]:
    """(template, type word), RULER's singular rewrite applied to template + answer prefix."""
    text = TEMPLATE + (ANSWER_PREFIX if answer_prefix else "")
    if not singular:
        return text, "numbers"
    text = text.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")
    return text, "number"

# RULER's repeated-noise haystack.
NOISE_HAYSTACK = ("The grass is green. The sky is blue. The sun is yellow. "
                  "Here we go. There and back again.")
# A short essay-like filler written for this repo; repeated as needed.
ESSAY_HAYSTACK = (
    "Most of the work that matters is done slowly, in small steps that look unremarkable at "
    "the time. A founder who rewrites the same page ten times is not wasting effort; each "
    "draft removes something that was not needed. Good ideas often look like bad ideas at "
    "first, which is why so few people pursue them. The hard part is not having the idea but "
    "noticing which of your assumptions are wrong. People who build things tend to learn by "
    "doing rather than by planning, and they change course when the evidence says so. A "
    "small group that talks to its users every week will usually beat a large group that "
    "talks to them once a year. Cities grew around rivers because moving goods by water was "
    "cheap, and habits formed around those routes long after the reason was gone. Reading "
    "widely helps because surprising connections come from fields that seem unrelated. When "
    "a problem feels too large, it is usually because it has not yet been split into parts. "
    "Patience is underrated, but so is the willingness to stop something that is not working."
)

_ADJ = ("amber brave calm dusty eager fancy gentle hollow icy jolly keen lively misty noisy "
        "odd proud quiet rapid silent tidy upbeat vivid wary young zesty bold crisp damp faint "
        "grand hasty lucky mellow nimble pale rustic sturdy tame vast witty").split()
_NOUN = ("anchor badge cabinet dragon engine falcon garden harbor island jacket kettle ladder "
         "meadow needle orchard pepper quartz river saddle tunnel umbrella violin wagon yacht "
         "zebra bridge candle desert feather glacier helmet lantern mirror notebook pillow "
         "rocket summit tractor valley window").split()

_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str | Iterable[str]) -> list[str]:
    """Sentences of ``text`` (or of several texts), split after . ! or ? plus whitespace."""
    texts = [text] if isinstance(text, str) else list(text)
    out = [s.strip() for t in texts for s in _SENT_SPLIT.split(t)]
    return [s for s in out if s]


def _canonical(variant: str) -> str:
    v = _ALIASES.get(variant.lower(), variant.lower())
    if v not in VARIANTS:
        raise ValueError(f"unknown NIAH variant {variant!r}; use one of {sorted(VARIANTS)}")
    return v


def _join_keys(keys: Sequence[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def _build(sentences: Sequence[str], k: int, start: int, needles: Sequence[str],
           depths: Sequence[int], query: str, template: tuple[str, str]) -> str:
    hay = [sentences[(start + i) % len(sentences)] for i in range(k)]
    cuts = [0] + sorted(int(k * (d / 100)) for d in depths) + [k]  # RULER's float expression
    parts: list[str] = []
    for i in range(1, len(cuts)):   # RULER: segment, needle, segment, needle, ..., segment
        parts.append(" ".join(hay[cuts[i - 1]:cuts[i]]))
        if i - 1 < len(needles):
            parts.append(needles[i - 1])
    text, word = template
    return text.format(type_needle_v=word, context=" ".join(p for p in parts if p), query=query)


def make_niah(variant: str, haystack: str | Sequence[str], tokenizer: Tokenizer, length: int, *,
              seed: int = 0, depths: Sequence[int] | None = None, num_keys: int | None = None,
              num_values: int | None = None, num_queries: int | None = None,
              answer_prefix: bool = True, tokens_to_generate: int = TOKENS_TO_GENERATE) -> dict[str, Any]:
    """One NIAH example: the longest prompt with ``len(prompt) + tokens_to_generate <= length``.

    ``depths``: integer percentages (0 = start, 100 = end of the haystack), one per needle
    (num_keys * num_values needles), paired with the needles in placement order; default
    a seeded sample of RULER's ``DEPTHS``. Returns a row with prompt, answers (the queried
    keys' values), task, length (prompt tokens), tokens_to_generate, max_seq_length, and
    the needles' keys / values / depths in placement order. Raises ValueError (one line)
    on a bad variant, depths, or a length too short for template + needles + budget.
    """
    variant = _canonical(variant)
    dk, dv, dq = VARIANTS[variant]
    nk, nv, nq = num_keys or dk, num_values or dv, num_queries or dq
    if not (1 <= nq <= nk):
        raise ValueError(f"num_queries must be in [1, num_keys={nk}], got {nq}")
    if tokens_to_generate < 0:
        raise ValueError(f"tokens_to_generate must be >= 0, got {tokens_to_generate}")
    sentences = split_sentences(haystack)
    if not sentences:
        raise ValueError("haystack has no text")
    rng = random.Random(f"niah-{variant}-{seed}")
    pairs = [f"{a}-{n}" for a in _ADJ for n in _NOUN]
    keys = rng.sample(pairs, nk)
    values = [str(v) for v in rng.sample(range(1_000_000, 10_000_000), nk * nv)]
    kv = [(keys[i], values[i * nv + j]) for i in range(nk) for j in range(nv)]
    rng.shuffle(kv)
    if depths is None:
        depths = rng.sample(DEPTHS, len(kv)) if len(kv) <= len(DEPTHS) else [rng.choice(DEPTHS) for _ in kv]
    if len(depths) != len(kv) or any(isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= 100
                                     for d in depths):
        raise ValueError(f"need {len(kv)} integer depths in [0, 100], got {list(depths)}")
    depths = sorted(depths)
    queried = rng.sample(range(nk), nq)
    query = _join_keys([keys[i] for i in queried])
    answers = [values[i * nv + j] for i in queried for j in range(nv)]
    needles = [NEEDLE.format(key=k, value=v) for k, v in kv]
    start = rng.randrange(len(sentences))
    template = _template(nq * nv == 1, answer_prefix)
    budget = length - tokens_to_generate

    cache: dict[int, tuple[str, int]] = {}

    def fit(k: int) -> tuple[str, int]:
        if k not in cache:
            p = _build(sentences, k, start, needles, depths, query, template)
            cache[k] = (p, len(tokenizer.encode(p)))
        return cache[k]

    if fit(0)[1] > budget:
        raise ValueError(f"length {length} is too short: template and needles alone take "
                         f"{fit(0)[1]} tokens, plus {tokens_to_generate} to generate")
    lo, hi = 0, 16  # invariant: fit(lo) <= budget; grow hi until it is over
    while fit(hi)[1] <= budget:
        if hi > 4 * length + 64:
            raise ValueError("haystack sentences add no tokens; cannot reach the length")
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fit(mid)[1] <= budget:
            lo = mid
        else:
            hi = mid
    prompt, n_tok = fit(lo)
    return {
        "prompt": prompt, "answers": answers, "task": f"niah_{variant}", "length": n_tok,
        "tokens_to_generate": tokens_to_generate, "max_seq_length": length,
        "query_keys": [keys[i] for i in queried], "needle_keys": [k for k, _ in kv],
        "needle_values": [v for _, v in kv], "needle_depths": depths, "seed": seed,
    }


def generate_niah(variant: str, haystack: str | Sequence[str], tokenizer: Tokenizer,
                  length: int, num_samples: int, *, seed: int = 0, **kwargs: Any) -> list[dict[str, Any]]:
    """``num_samples`` examples (sample ``i`` uses seed ``seed * 100_003 + i``), with an index."""
    rows = []
    for i in range(num_samples):
        row = make_niah(variant, haystack, tokenizer, length, seed=seed * 100_003 + i, **kwargs)
        rows.append({"index": i, **row})
    return rows


def niah_recall(prediction: str, answers: Sequence[str]) -> float:
    """Fraction of gold values present (case-insensitive) anywhere in the prediction."""
    if not answers:
        raise ValueError("niah_recall needs at least one gold answer")
    low = prediction.lower()
    return sum(a.lower() in low for a in answers) / len(answers)


def score_niah(preds: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """RULER ``string_match_all``: mean recall over examples, 0-100."""
    check_predictions("niah", preds, answers)
    return 100.0 * sum(niah_recall(p, a) for p, a in zip(preds, answers)) / len(preds)
