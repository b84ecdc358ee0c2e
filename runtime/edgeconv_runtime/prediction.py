"""What a prediction is, shared by ``Model`` and the video stream."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


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
