"""ROUGE-L F as LongBench computes it (the PyPI ``rouge`` package, default settings).

Own implementation (no third-party code) of the semantics of ``Rouge().get_scores(
[pred], [gold])[0]["rouge-l"]["f"]``, the call LongBench's ``rouge_score`` makes:

* each text is split into "sentences" on every ``.``; empty pieces are dropped and each
  remaining piece is whitespace-normalised (a piece of only spaces survives as ``""``);
* tokens are the space-separated words of the sentences (case and punctuation kept);
* m / n are the numbers of *distinct* tokens of the reference / hypothesis;
* the overlap is the size of the union (as a set of word strings) of the LCS tokens of
  every (reference sentence, hypothesis sentence) pair, with the package's LCS
  back-tracking tie-break (prefer moving along the hypothesis when equal);
* F = 2PR / (P + R + 1e-8) with P = overlap / n and R = overlap / m.

An empty hypothesis or reference (no sentences) makes the package raise, which
LongBench maps to 0.0; so does this function. Unlike the package, the LCS is rebuilt
iteratively, so very long single sentences do not hit Python's recursion limit.
"""
from __future__ import annotations

__all__ = ["rouge_l_f", "split_sentences", "lcs_tokens"]


def split_sentences(text: str) -> list[str]:
    """Split ``text`` on '.', drop empty pieces, normalise whitespace in each piece."""
    return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


def _words(sentences: list[str]) -> list[str]:
    return [w for s in sentences for w in s.split(" ")]


def lcs_tokens(ref: list[str], hyp: list[str]) -> list[str]:
    """One longest common subsequence of ``ref`` and ``hyp`` (package tie-break)."""
    n, m = len(ref), len(hyp)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        row, prev, r = table[i], table[i - 1], ref[i - 1]
        for j in range(1, m + 1):
            if r == hyp[j - 1]:
                row[j] = prev[j - 1] + 1
            else:
                row[j] = prev[j] if prev[j] > row[j - 1] else row[j - 1]
    out: list[str] = []
    i, j = n, m
    while i > 0 and j > 0:
        if ref[i - 1] == hyp[j - 1]:
            out.append(ref[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    out.reverse()
    return out


def rouge_l_f(prediction: str, reference: str) -> float:
    """Summary-level ROUGE-L F of ``prediction`` against ``reference`` (0-1)."""
    hyp_s = split_sentences(prediction)
    ref_s = split_sentences(reference)
    if not hyp_s or not ref_s:
        return 0.0
    n = len(set(_words(hyp_s)))
    m = len(set(_words(ref_s)))
    union: set[str] = set()
    hyp_words = [s.split(" ") for s in hyp_s]
    for r in ref_s:
        r_words = r.split(" ")
        for h_words in hyp_words:
            union.update(lcs_tokens(r_words, h_words))
    overlap = len(union)
    p, r_ = overlap / n, overlap / m
    return 2.0 * (p * r_) / (p + r_ + 1e-8)
