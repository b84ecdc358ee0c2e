from __future__ import annotations

import numpy as np


class Backend:
    """What every backend offers: run a preprocessed NCHW float32 batch, return logits."""

    name = "base"

    def infer(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass

    def describe(self) -> dict:
        return {"backend": self.name}
