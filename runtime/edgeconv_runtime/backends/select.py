"""Which backend runs a bundle: `auto` tries the registry's backends fastest first and collects why each one it passes
over cannot run; a named backend raises its own one-line error instead. Every rule here reads the backends'
declarations (base.py), none names a backend.

Also here, as they decide what a backend may run: the INT8 graph validated for this CPU (``cpu_int8_variant``), the
check of that graph against the bundle's reference outputs (else FP32 instead) and ``graph_mismatch``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..cpuclass import cpu_class
from ..errors import BackendUnavailable, EdgeconvError, first_line
from ..parity import parity_report, tolerance_problems
from . import REGISTRY, auto_order, available_backends, backend_class, create_backend, precision_problem

CPU_INT8_VARIANTS = ("default", "portable")  # the default graph first: it is the faster where it is valid


@dataclass
class Choice:
    """What select_backend found: a started backend and its artifact, or (``fp32_instead``) why INT8 must not run here."""

    backend: object = None
    artifact: Optional[Path] = None
    info: dict = field(default_factory=dict)  # "skipped": ["name: why", ...]; "int8_variant" for a CPU INT8 graph
    fp32_instead: Optional[str] = None


class _Skip(Exception):
    """One backend cannot run the bundle: ``reason`` for `auto`'s list, ``error`` for a named backend."""

    def __init__(self, reason: str, error: Exception, cause: Optional[BaseException] = None):
        super().__init__(reason)
        self.reason, self.error = reason, error
        if cause is not None:
            error.__cause__ = cause  # raise error from cause, when it is raised


def select_backend(bundle, backend: str = "auto", precision: str = "fp32", check_hash: bool = True, threads: Optional[int] = None,
                   spin: bool = True, batch_profile=None, cache_dir=None, create: Callable = create_backend, tuning: Optional[dict] = None,
                   int8_variant: Optional[str] = None) -> Choice:
    """The first backend of ``auto_order(precision)`` (or the one named) that starts with an artifact of ``bundle``.

    ``create`` makes the backend (create_backend's signature). A file that fails its sha256 is an error, never a skip.
    ``tuning``: the named backend's own options; ``int8_variant``: run that INT8 graph on a CPU backend (`tune` measured
    it on this CPU) instead of the one validated for this CPU's class; it is still checked against the reference outputs."""
    if backend != "auto":
        backend_class(backend).check_tuning(tuning)  # an unknown name or option is an error before anything else
    elif tuning:
        raise EdgeconvError("backend options (tuning) belong to one backend: name it instead of auto")
    if int8_variant is not None and int8_variant not in CPU_INT8_VARIANTS + ("tensorrt",):
        raise EdgeconvError(f"unknown INT8 graph variant {int8_variant!r}; use one of {', '.join(CPU_INT8_VARIANTS + ('tensorrt',))}")
    status = available_backends()
    options = {"precision": precision, "input_name": bundle.manifest.input.get("name"), "input_shape": tuple(bundle.preprocess.input_shape),
               "batch_profile": batch_profile, "cache_dir": cache_dir}
    if tuning:
        options["tuning"] = tuning
    skipped = []
    for name in auto_order(precision) if backend == "auto" else (backend,):
        try:
            choice = _attempt(bundle, name, status[name], precision, check_hash, backend == "auto",
                              lambda path: create(name, path, threads, spin, **options), int8_variant)
        except _Skip as skip:
            if backend == "auto":
                skipped.append(f"{name}: {skip.reason}")
                continue
            failed = skip.error
        else:
            choice.info["skipped"] = skipped
            return choice
        raise failed  # a named backend: its own error, raised outside the handler (as it was raised, with its cause)
    raise BackendUnavailable(f"no backend can run this bundle: {'; '.join(skipped)}")


def _attempt(bundle, name: str, status: tuple, precision: str, check_hash: bool, auto: bool, start: Callable,
             int8_variant: Optional[str] = None) -> Choice:
    ok, why = status
    if not ok:
        raise _Skip(why, BackendUnavailable(f"backend {name} is unavailable here: {why}"))
    unable = precision_problem(name, precision)
    if unable:
        raise _Skip(unable, BackendUnavailable(unable))
    cls = REGISTRY[name]
    fmt, stored, variant = cls.artifact_for(precision)
    cpu_int8 = stored == "int8" and cls.cpu
    if cpu_int8 and int8_variant is not None:
        if not bundle.has("onnx", "int8", int8_variant):
            raise _Skip(f"bundle has no {int8_variant} INT8 graph", EdgeconvError(
                f"bundle has no {int8_variant} INT8 graph; run `edgeconv-runtime tune` again (the bundle changed)"))
        variant = int8_variant
    elif cpu_int8 and bundle.has("onnx", "int8"):
        variant, why = cpu_int8_variant(bundle)
        if variant is None:
            bundle.wait_checked()
            return Choice(fp32_instead=why)
    missing = cls.missing_artifact(bundle, stored)
    if missing:
        if not auto and not bundle.has(fmt, stored):
            bundle.artifact(fmt, stored, check_hash)  # raises the precise message
        raise _Skip(missing, BackendUnavailable(missing))
    artifact, _ = bundle.artifact(fmt, stored, check_hash, variant=variant)  # an altered file is an error, not a skip
    try:
        be = start(str(artifact))
    except EdgeconvError as exc:  # the provider did not start, an engine for another GPU, a CUDA error
        raise _Skip(str(exc), exc)
    except (OSError, RuntimeError, ImportError) as exc:  # a broken GPU install
        if cls.base:
            raise
        reason = f"{type(exc).__name__}: {first_line(exc)}"
        raise _Skip(reason, BackendUnavailable(f"backend {name} could not start: {reason}"), exc)
    problem = graph_mismatch(bundle, be)
    if problem:
        be.close()
        raise EdgeconvError(problem)
    choice = Choice(be, artifact)
    if cpu_int8:
        choice.info["int8_variant"] = variant
        why = _int8_mismatch(bundle, be)
        if why:
            be.close()
            bundle.wait_checked()
            return Choice(fp32_instead=why)
    return choice


def cpu_int8_variant(bundle) -> tuple:
    """(variant, None) of the INT8 graph validated for this CPU's class, or (None, why) when there is none.
    Graphs from before the manifest recorded classes count as validated (they were the only INT8 graph)."""
    here = cpu_class()
    for variant in CPU_INT8_VARIANTS:
        a = bundle.manifest.find("onnx", "int8", variant)
        if a is not None and a.variant == variant and here in a.details.get("validated_cpu_classes", [here]):
            return variant, None
    have = {a.file: a.details.get("validated_cpu_classes") for a in bundle.manifest.artifacts if a.precision == "int8" and a.variant in CPU_INT8_VARIANTS}
    return None, (f"no INT8 graph of this bundle was validated on this CPU's class ({here}; "
                  + ", ".join(f"{f}: {', '.join(c or ['?'])}" for f, c in have.items()) + ")")


def _int8_mismatch(bundle, backend) -> Optional[str]:
    """Why a started INT8 backend fails the bundle's reference outputs on this CPU (the `verify` tolerance), or None."""
    tensors = bundle.reference_tensors()
    if tensors is None:
        return None
    x, expected = tensors
    problems = tolerance_problems(parity_report(expected, backend.infer(x)), "int8", backend=backend.name)
    return f"INT8 fails `verify` on this CPU ({'; '.join(problems)})" if problems else None


def graph_shapes(backend) -> Optional[tuple]:
    """(input shape, output shape) of the loaded graph, ints where static; None for a backend that does not tell."""
    io_shapes = getattr(backend, "io_shapes", None)
    return io_shapes() if io_shapes is not None else None


def graph_mismatch(bundle, backend) -> Optional[str]:
    """One line when the graph's input [N,C,H,W] or class count disagrees with the manifest, else None.

    Read from the backend's io_shapes() (ONNX Runtime's session, OpenVINO's compiled model; not a TensorRT engine);
    dimensions the graph leaves symbolic are not compared.
    """
    shapes = graph_shapes(backend)
    if shapes is None:
        return None
    got_in, got_out = shapes
    want_in = tuple(bundle.preprocess.input_shape)
    if len(got_in) != 4 or any(isinstance(g, int) and g != w for g, w in zip(got_in[1:], want_in)):
        return (f"the model graph takes input {got_in} but manifest.json preprocess gives [N, {', '.join(map(str, want_in))}]; "
                "the manifest does not belong to this model: re-export the bundle")
    n = len(bundle.classes)
    if len(got_out) != 2 or (isinstance(got_out[1], int) and got_out[1] != n):
        return (f"the model graph outputs {got_out} but manifest.json lists {n} classes; "
                "the manifest does not belong to this model: re-export the bundle")
    return None


# ---- the old model.py helpers, as the registry now answers them (tests and older callers use them)
def artifact_kind(backend: str) -> tuple:
    """(format, variant) of the artifact ``backend`` runs."""
    fmt, _, variant = backend_class(backend).artifact_for("fp32")
    return fmt, variant


def missing_artifact(bundle, backend: str, fmt: str, precision: str) -> Optional[str]:
    """Why ``bundle`` has nothing ``backend`` can run at ``precision`` (of format ``fmt``), or None."""
    cls = backend_class(backend)
    return cls.missing_artifact(bundle, precision) if fmt == cls.artifact_format else f"bundle has no {fmt} {precision} artifact"
