"""Parity of an exported artifact against the PyTorch model, on real images."""
from __future__ import annotations

from typing import Optional

import numpy as np


def parity_report(reference: np.ndarray, candidate: np.ndarray, labels: Optional[np.ndarray] = None) -> dict:
    """Max abs logit difference, mean cosine similarity, top-1 agreement and accuracy."""
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    finite = bool(np.isfinite(cand).all())
    diff = np.abs(ref - cand)
    cos = (ref * cand).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1) + 1e-12)
    agree = ref.argmax(1) == cand.argmax(1)
    out = {
        "n": int(len(ref)),
        "finite": finite,
        "max_abs_diff": float(diff.max()) if finite else float("inf"),
        "mean_abs_diff": float(diff.mean()) if finite else float("inf"),
        "cosine_min": float(cos.min()) if finite else 0.0,
        "cosine_mean": float(cos.mean()) if finite else 0.0,
        "top1_agreement": float(agree.mean()),
    }
    if labels is not None:
        out["accuracy"] = float((cand.argmax(1) == labels).mean())
        out["reference_accuracy"] = float((ref.argmax(1) == labels).mean())
    return out
