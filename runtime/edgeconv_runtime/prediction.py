"""What a prediction is, and the one way logits become one: softmax, top-k (highest first, ties by class index),
labels. ``Model.predict``, the stream, ``/v1/predict`` and the v2 protocol all answer through it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


@dataclass
class Prediction:
    """Top-k labels and probabilities for one image."""

    labels: list
    probabilities: list
    indices: list
    source: Optional[str] = None

    @property
    def label(self) -> str:
        return self.labels[0]

    def to_dict(self) -> dict:
        d = {"top": [{"label": l, "index": int(i), "probability": float(p)} for l, i, p in zip(self.labels, self.indices, self.probabilities)]}
        if self.source is not None:
            d["source"] = self.source
        return d


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of [N, classes] logits, in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """[N, k] class indices of each row's ``k`` highest scores, highest first; equal scores by class index."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def predictions(logits: np.ndarray, classes: Sequence[str], top_k: int, sources: Optional[Sequence] = None) -> list:
    """One ``Prediction`` per row of [N, classes] logits: the top ``top_k`` (at least 1, at most every class)."""
    probs = softmax(logits)
    k = max(1, min(int(top_k), len(classes)))
    sources = sources if sources is not None else [None] * len(probs)
    return [Prediction([classes[i] for i in idx], [float(p[i]) for i in idx], [int(i) for i in idx], src)
            for p, idx, src in zip(probs, top_indices(probs, k), sources)]
