"""The runner interface every backend implements, and what each declares about itself.

A backend is one class in one module (Polygraphy's runner is the model): its class attributes say what it is
(``name``, the precisions it runs, the artifact it runs for each, its Triton platform, its pip extra, where `auto`
tries it); ``status()`` says whether it can run here (or why not), ``create()`` starts it on an artifact, and the
instance offers ``io_shapes()``, ``infer()``, ``describe()`` and ``close()``. The registry (``backends/__init__.py``)
is built from these declarations and `auto`'s selection loop (``backends/select.py``) reads only them.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..manifest import PRECISIONS

# the bundle's own precisions: what a backend runs unless it declares otherwise
BUNDLE_PRECISIONS = PRECISIONS


class Backend:
    """What every backend offers: run a preprocessed NCHW float32 batch, return logits.

    A backend holds native resources (an ONNX Runtime session, a TensorRT context, CUDA buffers):
    ``close()`` releases them, may be called more than once, and ``with backend:`` calls it.
    """

    name = "base"
    # ---- declarations (read by the registry and by `auto`; a new backend sets the ones that differ)
    precisions: Optional[tuple] = None  # the precisions it runs; None: the bundle's own (fp32, fp16, int8)
    artifact_format = "onnx"  # the manifest format of the artifact it runs
    artifact_variant: Optional[str] = None  # the variant it prefers (None: the default artifact)
    artifact_precision: dict = {}  # a runtime precision that runs another precision's artifact (bf16 -> fp32)
    triton_platform = "onnxruntime_onnx"  # Triton's name for it (v2 model metadata)
    extra: Optional[str] = None  # the pip extra that installs it: pip install 'edgeconv-runtime[EXTRA]'
    auto_rank = 100.0  # `auto` tries the lowest rank first (fastest first); see auto_rank_for()
    cpu = False  # runs on the CPU: its INT8 sums depend on the CPU's instructions (cpuclass.py)
    base = False  # the backend every install has: a broken install of it is an error, never a skip
    file_suffixes: tuple = ()  # a bare file of these suffixes runs on this backend under `auto`

    # ---- class-level: what the registry asks before one exists
    @classmethod
    def status(cls) -> tuple:
        """(usable, reason) on this machine, without starting anything heavy."""
        return True, "ok"

    @classmethod
    def create(cls, path: str, threads: Optional[int] = None, spin: bool = True, precision: str = "fp32", **options) -> "Backend":
        """The backend running ``path``; ``options`` are those of create_backend, each backend taking the ones it uses."""
        return cls(path, threads=threads)

    @classmethod
    def auto_rank_for(cls, precision: str) -> float:
        return cls.auto_rank

    @classmethod
    def artifact_for(cls, precision: str) -> tuple:
        """(format, precision, variant) of the bundle artifact this backend runs at ``precision``."""
        return cls.artifact_format, cls.artifact_precision.get(precision, precision), cls.artifact_variant

    @classmethod
    def missing_artifact(cls, bundle, precision: str) -> Optional[str]:
        """Why ``bundle`` has nothing this backend can run at ``precision`` (the artifact's), or None."""
        fmt = cls.artifact_format
        return None if bundle.has(fmt, precision) else f"bundle has no {fmt} {precision} artifact"

    # ---- instance: the runner
    def io_shapes(self) -> Optional[tuple]:
        """(input shape, output shape) of the loaded graph, ints where static; None for a backend that does not tell."""
        return None

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
