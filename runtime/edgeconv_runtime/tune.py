"""``edgeconv-runtime tune``: the fastest configuration that keeps its accuracy, measured on this device.

1. Images: ``--data`` (class sub-folders named like the bundle's classes) preprocessed once, or the bundle's
   reference inputs; the FP32 graph on ONNX Runtime gives the reference logits (and accuracy, with labels).
2. Every usable backend x precision x INT8 graph runs those images once: a candidate that loses more than
   ``max_drop`` points (accuracy against FP32's here, or top-1 agreement with FP32 without labels) is dropped with
   its figures. Measured here because the same INT8 graph loses more on an x86 CPU without VNNI than on one with it.
3. Each surviving engine x its backend's settings (threads, streams, arena, OpenVINO's hints) x batch size is timed
   in alternating rounds: every round visits every candidate once, each time after two warm-up runs, and a
   candidate's figure is the median of its rounds, so a burst of noise costs one round of one candidate, not the choice.
   The FINALISTS best, with the default configuration beside them, are then timed again head to head (more rounds,
   longer each): a candidate that was lucky once does not win on it.
4. The best finalist by the objective (latency: p50 at the smallest batch; throughput: images/s at any batch) wins; rows
   within ``TIE`` of it count as equal and the most accurate of those (then the simplest configuration) is chosen.
5. The choice goes into the bundle as this device's profile (profiles.py); a stop at the budget keeps the best so
   far; Ctrl-C writes nothing.
"""
from __future__ import annotations

import datetime as _dt
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .errors import BackendUnavailable, EdgeconvError

OBJECTIVES = ("latency", "throughput")
TIE = 0.03  # rows within 3 % of the best figure are a tie: noise on a busy machine is that large
WARMUP = 2
MIN_CALLS = 3
FINALISTS = 4  # the best of the screening rounds, re-measured head to head (with the default configuration)
EVAL_BATCH = 32


@dataclass
class TuneConfig:
    bundle: str
    data: Optional[str] = None
    max_drop: float = 0.5
    objective: str = "latency"
    batch_sizes: Sequence[int] = (1, 8, 32)
    budget_s: float = 300.0
    json_path: Optional[str] = None
    write_profile: bool = True
    sign_key: Optional[str] = None
    max_images: int = 500  # --data images used for accuracy (spread over the classes)
    rounds: int = 5
    slice_s: float = 0.25  # seconds per candidate per batch size per round
    backends: Optional[Sequence[str]] = None  # None: every registered backend usable here
    precisions: Optional[Sequence[str]] = None  # None: every precision the bundle and the backend have
    progress: Optional[Callable[[str], None]] = None


@dataclass
class _Engine:
    """One backend x precision x INT8 graph, as loaded for the accuracy check."""

    backend: str
    precision: str
    int8_variant: Optional[str]
    accuracy: Optional[float] = None
    agreement: Optional[float] = None
    drop: Optional[float] = None
    fixed_batch: Optional[int] = None


@dataclass
class _Candidate:
    engine: _Engine
    threads: Optional[int]
    options: dict
    model: object = None
    stages: dict = field(default_factory=dict)  # "screening" | "final" -> batch -> {"medians": per round, "samples": every call}

    @property
    def config(self) -> str:
        """Short words for the table: INT8 graph, threads (as run), options ("portable 1thr streams=2")."""
        threads = self.threads or getattr(getattr(self.model, "backend", None), "threads", None)
        parts = [self.engine.int8_variant] if self.engine.int8_variant else []
        parts.append(f"{threads}thr" if threads else "default thr")
        parts += [f"{k}={({True: 'on', False: 'off'}.get(v, v) if isinstance(v, bool) else v)}" for k, v in sorted(self.options.items())]
        return " ".join(parts)


def _check(cfg: TuneConfig) -> None:
    if cfg.objective not in OBJECTIVES:
        raise EdgeconvError(f"unknown objective {cfg.objective!r}; use latency or throughput")
    if not (cfg.max_drop >= 0):
        raise EdgeconvError(f"--max-drop must be 0 or more points, got {cfg.max_drop}")
    if not (cfg.budget_s > 0):
        raise EdgeconvError(f"--budget-s must be more than 0 seconds, got {cfg.budget_s}")
    if not cfg.batch_sizes or min(cfg.batch_sizes) < 1:
        raise EdgeconvError("--batch-sizes needs whole numbers >= 1")
    if not Path(cfg.bundle).is_dir():
        raise EdgeconvError(f"{cfg.bundle} is not a bundle directory; tune writes its profile into a bundle (`edgeconv export` or "
                            "`edgeconv import` writes one)")
    if cfg.data is not None and not Path(cfg.data).is_dir():
        raise EdgeconvError(f"image folder not found: {cfg.data}; pass a folder with one sub-folder per class")


def _images(bundle, cfg: TuneConfig) -> tuple:
    """(inputs NCHW float32, labels or None, source description)."""
    if cfg.data is None:
        tensors = bundle.reference_tensors()
        if tensors is None:
            raise EdgeconvError("the bundle has no reference inputs to tune on; pass --data with class sub-folders of real images")
        return tensors[0], None, f"{len(tensors[0])} reference inputs of the bundle (agreement with FP32)"
    from .imagefolder import class_folders, image_files, shown
    from .preprocess import load_pixels, normalize

    root = Path(cfg.data)
    folders = class_folders(root)
    names = [shown(p.name) for p in folders]
    unknown = [n for n in names if n not in bundle.classes]
    if unknown or not folders:
        raise EdgeconvError(f"{cfg.data} needs sub-folders named after the model's classes {bundle.classes[:10]}; found {names[:10]}")
    per = max(1, -(-cfg.max_images // len(folders)))
    pixels, labels = [], []
    for folder, name in zip(folders, names):
        for f in image_files(folder)[:per]:
            try:
                pixels.append(load_pixels(f, bundle.preprocess, strict=False))
            except EdgeconvError:
                continue
            labels.append(bundle.classes.index(name))
    if not pixels:
        raise EdgeconvError(f"no readable images under {cfg.data}")
    return normalize(np.stack(pixels), bundle.preprocess), np.asarray(labels), f"{len(labels)} images of {cfg.data} (accuracy)"


def _logits(model, x: np.ndarray, fixed: Optional[int]) -> np.ndarray:
    step = fixed or EVAL_BATCH
    out = []
    for i in range(0, len(x), step):
        chunk = x[i:i + step]
        if fixed and len(chunk) < fixed:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - len(chunk), axis=0)])
        out.append(model.run(np.ascontiguousarray(chunk))[: min(step, len(x) - i)])
    return np.concatenate(out)


def _fixed_batch(model) -> Optional[int]:
    shapes = getattr(model.backend, "io_shapes", lambda: None)()
    if shapes and shapes[0] and isinstance(shapes[0][0], int) and shapes[0][0] > 0:
        return shapes[0][0]
    return None


def _engines(bundle, cfg: TuneConfig, skipped: list) -> list:
    """Every backend x precision x INT8 graph this machine and this bundle can run, registry order (fp32 first)."""
    from .backends import REGISTRY, available_backends, backend_class, precision_problem
    from .backends.select import CPU_INT8_VARIANTS
    from .manifest import RUNTIME_PRECISIONS

    status = available_backends()
    names = list(cfg.backends) if cfg.backends else list(REGISTRY)
    for n in names:
        backend_class(n)
    out = []
    for name in names:
        cls = REGISTRY[name]
        ok, why = status[name]
        if not ok:
            skipped.append({"backend": name, "precision": "*", "reason": why})
            continue
        for precision in (cfg.precisions or RUNTIME_PRECISIONS):
            if precision_problem(name, precision):
                continue
            fmt, stored, _ = cls.artifact_for(precision)
            if cls.missing_artifact(bundle, stored):
                if cfg.precisions:
                    skipped.append({"backend": name, "precision": precision, "reason": cls.missing_artifact(bundle, stored)})
                continue
            if stored == "int8" and cls.cpu:
                variants = [v for v in CPU_INT8_VARIANTS + ("tensorrt",) if bundle.manifest.find("onnx", "int8", v) is not None]
                out += [_Engine(name, precision, v) for v in variants]
            else:
                out.append(_Engine(name, precision, None))
    return out


def _load(bundle_dir: str, engine: _Engine, threads=None, options=None):
    from .model import Model

    return Model.load(bundle_dir, backend=engine.backend, precision=engine.precision, threads=threads, profile=False,
                      tuning=options or None, int8_variant=engine.int8_variant)


def run_tune(cfg: TuneConfig) -> dict:
    """Measure, choose, and (``write_profile``) keep the choice in the bundle; returns the result (the JSON written)."""
    _check(cfg)
    say = cfg.progress or (lambda line: None)
    t_start = time.perf_counter()
    deadline = t_start + cfg.budget_s
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    from .bundle import read_bundle
    from .profiles import check_writable, current_versions, device_id, device_identity

    bundle = read_bundle(cfg.bundle)  # every file checked, signatures included, before anything is measured
    if cfg.write_profile:
        check_writable(cfg.bundle, cfg.sign_key)
    x, labels, source = _images(bundle, cfg)
    skipped: list = []
    candidates: list = []
    stopped_early = False
    try:
        ref_model = _load(cfg.bundle, _Engine("onnxruntime-cpu", "fp32", None))
        try:
            ref = _logits(ref_model, x, _fixed_batch(ref_model))
        finally:
            ref_model.close()
        if not np.isfinite(ref).all():
            raise EdgeconvError("the FP32 graph gives non-finite outputs on these images; re-export the bundle")
        fp32_acc = float((ref.argmax(1) == labels).mean()) if labels is not None else None
        say(f"reference: FP32 on onnxruntime-cpu, {source}" + (f", accuracy {fp32_acc * 100:.2f} %" if fp32_acc is not None else ""))
        engines = _engines(bundle, cfg, skipped)
        cores = device_identity()["cores"]  # the cores this process may use, as the profile records them
        for i, engine in enumerate(engines):
            if time.perf_counter() > deadline and candidates:
                stopped_early = True
                skipped += [{"backend": e.backend, "precision": e.precision, "reason": "not measured: --budget-s reached"} for e in engines[i:]]
                break
            first = _accuracy_pass(cfg, engine, x, labels, ref, fp32_acc, skipped, say)
            if first is None:
                continue
            from .backends import REGISTRY

            for j, (threads, options) in enumerate(REGISTRY[engine.backend].tunings(cores)):
                if options.get("streams") and engine.fixed_batch:
                    continue  # a graph with a fixed batch size cannot be split into sub-batches
                cand = _Candidate(engine, threads, dict(options))
                try:
                    cand.model = first if j == 0 else _load(cfg.bundle, engine, threads, options)
                except (BackendUnavailable, EdgeconvError) as exc:
                    skipped.append({"backend": engine.backend, "precision": engine.precision, "config": cand.config, "reason": str(exc)})
                    continue
                candidates.append(cand)
        if not candidates:
            result = _result(cfg, bundle, started, t_start, [], skipped, None, source, fp32_acc, stopped_early)
            _write_json(cfg, result)
            return result
        batches = _batch_sizes(cfg, candidates)
        inputs = {b: np.ascontiguousarray(np.resize(x, (b, *x.shape[1:]))) for b in batches}
        pairs = [(c, b) for b in batches for c in candidates if not (c.engine.fixed_batch and b != c.engine.fixed_batch)]
        stopped_early |= _time_rounds(cfg, pairs, inputs, cfg.rounds, cfg.slice_s, deadline, say)
        if not stopped_early and len(candidates) > 1:
            finals = _finalists(cfg, _rows(candidates, batches))
            stopped_early |= _time_rounds(cfg, finals, inputs, max(3, cfg.rounds), 2 * cfg.slice_s, deadline, say, stage="final")
        rows = [row for _, row in _rows(candidates, batches)]
        chosen = _choose(cfg, rows)
        result = _result(cfg, bundle, started, t_start, rows, skipped, chosen, source, fp32_acc, stopped_early)
        if chosen is not None and cfg.write_profile:
            from .profiles import write_profile

            config = {k: chosen[k] for k in ("backend", "precision", "int8_variant", "options")}
            config["threads"] = None if chosen["default_threads"] else chosen["threads"]  # None: this device's default
            config["batch"] = chosen["batch"] if cfg.objective == "throughput" else None
            doc = {"format": "edgeconv.profile", "version": 1, "device_id": device_id(), "device": device_identity(),
                   "versions": current_versions(), "created": started, "objective": cfg.objective, "max_drop": cfg.max_drop,
                   "data": source, "config": config,
                   "measured": {k: chosen.get(k) for k in ("batch", "p50_ms", "p99_ms", "throughput_ips", "accuracy", "agreement",
                                                           "drop_points", "rounds")},
                   "tune_seconds": result["seconds"]}
            result["profile"] = write_profile(cfg.bundle, doc, cfg.sign_key)
        _write_json(cfg, result)
        return result
    finally:
        for c in candidates:
            if c.model is not None:
                c.model.close()


def _accuracy_pass(cfg, engine: _Engine, x, labels, ref, fp32_acc, skipped: list, say):
    """The engine loaded with its backend's defaults and run once over the images; None (and a skip row) when it cannot
    start, falls back, or loses more than ``max_drop`` points."""
    label = f"{engine.backend} {engine.precision}" + (f" ({engine.int8_variant})" if engine.int8_variant else "")
    try:
        model = _load(cfg.bundle, engine)
    except (BackendUnavailable, EdgeconvError) as exc:
        skipped.append({"backend": engine.backend, "precision": engine.precision, "int8_variant": engine.int8_variant, "reason": str(exc)})
        return None
    if model.info.get("int8_fallback"):
        model.close()
        skipped.append({"backend": engine.backend, "precision": engine.precision, "int8_variant": engine.int8_variant,
                        "reason": model.info["int8_fallback"]})
        return None
    engine.fixed_batch = _fixed_batch(model)
    try:
        got = _logits(model, x, engine.fixed_batch)
    except EdgeconvError as exc:
        model.close()
        skipped.append({"backend": engine.backend, "precision": engine.precision, "int8_variant": engine.int8_variant, "reason": str(exc)})
        return None
    engine.agreement = float((got.argmax(1) == ref.argmax(1)).mean())
    if labels is not None:
        engine.accuracy = float((got.argmax(1) == labels).mean())
        engine.drop = (fp32_acc - engine.accuracy) * 100
        what = f"accuracy {engine.accuracy * 100:.2f} % (FP32 {fp32_acc * 100:.2f} %)"
    else:
        engine.drop = (1 - engine.agreement) * 100
        what = f"top-1 agreement with FP32 {engine.agreement * 100:.2f} %"
    if not np.isfinite(got).all():
        reason = "non-finite outputs"
    elif engine.drop > cfg.max_drop + 1e-9:
        reason = f"{what}: {engine.drop:.2f} points lost > --max-drop {cfg.max_drop}"
    else:
        say(f"kept {label}: {what}")
        return model
    model.close()
    say(f"dropped {label}: {reason}")
    skipped.append({"backend": engine.backend, "precision": engine.precision, "int8_variant": engine.int8_variant, "reason": reason,
                    "accuracy": engine.accuracy, "agreement": engine.agreement, "drop_points": engine.drop})
    return None


def _batch_sizes(cfg: TuneConfig, candidates: list) -> list:
    fixed = {c.engine.fixed_batch for c in candidates if c.engine.fixed_batch}
    if fixed:
        return sorted(fixed)
    sizes = sorted(set(int(b) for b in cfg.batch_sizes))
    return sizes[:1] if cfg.objective == "latency" else sizes


def _time_rounds(cfg: TuneConfig, pairs: list, inputs: dict, rounds: int, slice_s: float, deadline: float, say,
                 stage: str = "screening") -> bool:
    """Alternating rounds over the (candidate, batch size) ``pairs`` until ``rounds`` or the deadline; True when the
    deadline cut it short (what was measured stands). Figures go to each candidate's ``stage`` record."""
    perf = time.perf_counter
    for r in range(max(1, rounds)):
        order = pairs[r % len(pairs):] + pairs[: r % len(pairs)]  # each round starts somewhere else, and every other one runs backwards
        if r % 2:
            order.reverse()
        t_round = perf()
        for cand, b in order:
            if perf() > deadline and r > 0:
                return True
            xb = inputs[b]
            run = cand.model.run
            for _ in range(WARMUP):
                run(xb)
            times, end = [], perf() + slice_s
            while len(times) < MIN_CALLS or perf() < end:
                t = perf()
                run(xb)
                times.append(perf() - t)
            record = cand.stages.setdefault(stage, {})
            record.setdefault(b, {"medians": [], "samples": []})
            record[b]["medians"].append(float(np.median(times)))
            record[b]["samples"].extend(times)
        say(f"{stage} round {r + 1}/{rounds}: {len(order)} measurements in {perf() - t_round:.1f} s")
        if perf() > deadline:
            return r + 1 < rounds
    return False


def _figures(record: dict, b: int) -> dict:
    p50 = float(np.median(record[b]["medians"])) * 1e3
    return {"p50_ms": p50, "p99_ms": float(np.percentile(np.asarray(record[b]["samples"]) * 1e3, 99)), "throughput_ips": b * 1e3 / p50,
            "rounds": len(record[b]["medians"]), "calls": len(record[b]["samples"])}


def _rows(candidates: list, batches: list) -> list:
    """(candidate, row) for every candidate x batch size measured; a finalist's figures are its final rounds' (its
    screening p50 kept beside them)."""
    out = []
    for c in candidates:
        screening, final = c.stages.get("screening", {}), c.stages.get("final", {})
        for b in batches:
            if b not in screening:
                continue
            row = {"backend": c.engine.backend, "precision": c.engine.precision, "int8_variant": c.engine.int8_variant,
                   "threads": c.threads or getattr(c.model.backend, "threads", None), "options": dict(c.options),
                   "default_threads": c.threads is None, "config": c.config, "batch": b, **_figures(screening, b),
                   "accuracy": c.engine.accuracy, "agreement": c.engine.agreement, "drop_points": c.engine.drop, "final": b in final,
                   "chosen": False}
            if b in final:
                row["screening_p50_ms"] = row["p50_ms"]
                row.update(_figures(final, b))
            out.append((c, row))
    return out


def _finalists(cfg: TuneConfig, pairs: list) -> list:
    """The FINALISTS best (candidate, batch) by their screening figures, and the first candidate (the first backend's
    defaults: what `auto` runs) at its best batch size: re-measured head to head, so a lucky screening round does not
    pick the winner and the choice is never slower than the default by more than noise."""
    ranked = sorted(pairs, key=lambda cr: -_score(cfg, cr[1]))
    picked = ranked[:FINALISTS]
    first = [cr for cr in ranked if cr[0] is pairs[0][0]][:1]
    for cr in first:
        if all(cr[0] is not c or cr[1]["batch"] != r["batch"] for c, r in picked):
            picked.append(cr)
    return [(c, r["batch"]) for c, r in picked]


def _score(cfg: TuneConfig, row: dict) -> float:
    """Higher is better."""
    return -row["p50_ms"] if cfg.objective == "latency" else row["throughput_ips"]


def _choose(cfg: TuneConfig, rows: list) -> Optional[dict]:
    """The best row by the objective; rows within TIE of it are equal, and the most accurate of those (then the one
    measured first: the backend's default settings) wins."""
    if not rows:
        return None
    pool = [r for r in rows if r["final"]] or rows  # the finalists' head-to-head figures decide, where they were measured
    best = max(_score(cfg, r) for r in pool)
    margin = abs(best) * TIE
    tied = [r for r in pool if _score(cfg, r) >= best - margin]
    quality = lambda r: r["accuracy"] if r["accuracy"] is not None else r["agreement"]  # noqa: E731
    chosen = max(tied, key=lambda r: (round(quality(r), 6), -rows.index(r)))
    chosen["chosen"] = True
    return chosen


def _result(cfg, bundle, started, t_start, rows, skipped, chosen, source, fp32_acc, stopped_early) -> dict:
    from .bench import environment
    from .compare import device_label
    from .profiles import device_id, device_identity
    from .versions import library_versions

    result = {"kind": "tune", "bundle": str(Path(cfg.bundle).resolve()), "model": bundle.name, "timestamp": started,
              "objective": cfg.objective, "max_drop": cfg.max_drop, "budget_s": cfg.budget_s, "batch_sizes": list(cfg.batch_sizes),
              "data": source, "fp32_accuracy": fp32_acc, "device_id": device_id(), "device_identity": device_identity(),
              "versions": library_versions(), "environment": environment(), "rows": _sorted(cfg, rows), "skipped": skipped,
              "chosen": chosen, "profile": None, "stopped_early": stopped_early, "seconds": round(time.perf_counter() - t_start, 2)}
    result["device"] = device_label(result)
    return result


def _sorted(cfg: TuneConfig, rows: list) -> list:
    """The finalists first (their head-to-head figures), then the rest by their screening figures."""
    return sorted(rows, key=lambda r: (not r["final"], -_score(cfg, r), r["batch"]))


def _write_json(cfg: TuneConfig, result: dict) -> None:
    if cfg.json_path:
        from .fileio import atomic_write_json

        atomic_write_json(cfg.json_path, result)


COLUMNS = (("", 1), ("backend", 16), ("precision", 9), ("config", 30), ("batch", 5), ("p50 ms", 9), ("p99 ms", 9), ("images/s", 9),
           ("acc/agree", 9), ("drop", 6))


def format_tune_table(result: dict) -> str:
    """The measured rows, best first by the objective, the chosen one marked ``*``; then why each skipped candidate was
    skipped; then the choice and where it was written."""
    def cell(v, w, left=False):
        if v is None:
            s = "-"
        elif isinstance(v, float):
            s = f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"
        else:
            s = str(v)
        s = s if len(s) <= w else s[: w - 1] + "~"
        return s.ljust(w) if left else s.rjust(w)

    lines = [" ".join(cell(h, w, i in (0, 1, 2, 3)) for i, (h, w) in enumerate(COLUMNS))]
    for r in result["rows"]:
        quality = r["accuracy"] if r["accuracy"] is not None else r["agreement"]
        vals = ("*" if r["chosen"] else "+" if r["final"] else "", r["backend"], r["precision"], r["config"], r["batch"], r["p50_ms"], r["p99_ms"],
                r["throughput_ips"], None if quality is None else f"{quality * 100:.2f}%", None if r["drop_points"] is None else f"{r['drop_points']:.2f}")
        lines.append(" ".join(cell(v, w, i in (0, 1, 2, 3)) for i, (v, (_, w)) in enumerate(zip(vals, COLUMNS))))
    for s in result["skipped"]:
        what = " ".join(str(s[k]) for k in ("backend", "precision", "int8_variant", "config") if s.get(k))
        lines.append(f"skipped {what}: {s['reason']}"[:300])
    chosen = result.get("chosen")
    lines.append("(* chosen; + finalist, timed again head to head: its figures are those rounds'; the others: screening rounds)")
    head = (f"objective {result['objective']} (max drop {result['max_drop']} points; {result['data']}); "
            f"tuned in {result['seconds']:.1f} s" + (" (stopped at --budget-s: best so far)" if result.get("stopped_early") else ""))
    lines.append(head)
    if chosen is None:
        lines.append("no configuration kept its accuracy: nothing chosen")
    else:
        where = f"written to {result['profile']}" if result.get("profile") else "not written (--no-write)"
        lines.append(f"chosen: {chosen['backend']} {chosen['precision']} {chosen['config']} batch {chosen['batch']}: "
                     f"p50 {chosen['p50_ms']:.3f} ms, {chosen['throughput_ips']:.0f} images/s; {where}")
    return "\n".join(lines)


def print_progress(line: str) -> None:
    print(f"tune: {line}", file=sys.stderr, flush=True)


__all__ = ["OBJECTIVES", "TuneConfig", "format_tune_table", "print_progress", "run_tune"]
