"""Scores as Super-NaturalInstructions computes them: ROUGE-L and exact match.

Follows SNI's `compute_metrics.py`: ROUGE-L is rouge-score's `rougeL`
F-measure with the Porter stemmer, exact match compares texts after SNI's
normalisation (lower-case, punctuation removed, whitespace collapsed; articles
are kept, unlike SQuAD), and each prediction takes the max over its reference
outputs. Scores are in [0, 1] (SNI reports them x100).

One documented deviation: for non-English outputs SNI tokenizes with mT5's
SentencePiece model (`xlingual=True`), which needs a download; we use a
Unicode-aware tokenizer instead (lower-cased runs of letters/digits of any
script, and each CJK character as its own token). rouge-score's default
tokenizer would drop every non-ASCII character and score such outputs 0.
"""

from __future__ import annotations

import re
import string
from typing import Sequence

import numpy as np
from rouge_score import rouge_scorer, tokenizers

_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SNI's normalisation: lower, drop ASCII punctuation, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
_XLINGUAL_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+", re.UNICODE)


class _XlingualTokenizer(tokenizers.Tokenizer):
    def tokenize(self, text):
        return _XLINGUAL_TOKEN.findall(text.lower())


_SCORERS = {
    False: rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True),
    True: rouge_scorer.RougeScorer(["rougeL"], tokenizer=_XlingualTokenizer()),
}


def rouge_l(prediction: str, reference: str, *, xlingual: bool = False) -> float:
    return _SCORERS[xlingual].score(target=reference, prediction=prediction)["rougeL"].fmeasure


def max_over_references(metric, prediction: str, references: Sequence[str], **kwargs) -> float:
    if not references:
        raise ValueError("Every instance needs at least one reference output; got none.")
    return max(metric(prediction, reference, **kwargs) for reference in references)


def score_predictions(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    xlingual: Sequence[bool] | bool = False,
) -> dict[str, np.ndarray]:
    """Per-example `rougeL` and `exact_match` arrays (max over references)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists.")
    if isinstance(xlingual, bool):
        xlingual = [xlingual] * len(predictions)
    rouge = [
        max_over_references(rouge_l, p, r, xlingual=x)
        for p, r, x in zip(predictions, references, xlingual)
    ]
    em = [max_over_references(exact_match, p, r) for p, r in zip(predictions, references)]
    return {"rougeL": np.asarray(rouge, np.float64), "exact_match": np.asarray(em, np.float64)}


def needs_xlingual(language: str) -> bool:
    """SNI scores non-English outputs with its cross-lingual tokenizer."""
    return language.strip().lower() not in ("english", "")
