from __future__ import annotations

import numpy as np


class Backend:
    """What every backend offers: run a preprocessed NCHW float32 batch, return logits.

    A backend holds native resources (an ONNX Runtime session, a TensorRT context, CUDA buffers):
    ``close()`` releases them, may be called more than once, and ``with backend:`` calls it.
    """

    name = "base"

    def infer(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass

    def describe(self) -> dict:
        return {"backend": self.name}

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
