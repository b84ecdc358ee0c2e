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

from ..errors import EdgeconvError
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
    tuning_keys: tuple = ()  # the options create() takes in ``tuning`` (`tune` tries them; a profile records them)

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
    def tunings(cls, cores: int) -> list:
        """The (threads, options) settings `tune` measures on a machine with ``cores`` usable cores; threads None is the
        backend's default, options go to create(tuning=...). The first is the default configuration."""
        return [(None, {})]

    @classmethod
    def check_tuning(cls, tuning: Optional[dict]) -> dict:
        """``tuning`` as create() takes it; one line for an option this backend does not have or a value out of range."""
        tuning = dict(tuning or {})
        unknown = sorted(set(tuning) - set(cls.tuning_keys))
        if unknown:
            have = ", ".join(cls.tuning_keys) or "none"
            raise EdgeconvError(f"backend {cls.name} has no option {', '.join(map(str, unknown))} (its options: {have})")
        streams = tuning.get("streams")
        if streams is not None and (not isinstance(streams, int) or isinstance(streams, bool) or not 1 <= streams <= 256):
            raise EdgeconvError(f"streams must be a whole number from 1 to 256, got {streams!r}")
        return tuning

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


class Streams:
    """One batch run as ``n`` sub-batches at once, one per stream: OpenVINO's throughput streams, or ONNX Runtime runs
    on one intra-op thread each. On a few cores a small model often runs n single-threaded sub-batches faster than one
    n-threaded batch (no synchronisation between the threads inside each layer). ``run_chunk(i, x)`` runs stream i."""

    def __init__(self, n: int, run_chunk):
        from concurrent.futures import ThreadPoolExecutor

        self.n, self.run_chunk = n, run_chunk
        self.pool = ThreadPoolExecutor(n - 1, thread_name_prefix="edgeconv-stream") if n > 1 else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.pool is None or len(x) < 2:
            return self.run_chunk(0, x)
        k = min(self.n, len(x))
        bounds = np.linspace(0, len(x), k + 1).astype(int)
        futures = [self.pool.submit(self.run_chunk, i, x[bounds[i]:bounds[i + 1]]) for i in range(1, k)]
        first = self.run_chunk(0, x[bounds[0]:bounds[1]])  # the caller's thread is stream 0
        return np.concatenate([first] + [f.result() for f in futures])

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False)
            self.pool = None
