"""Peak resident memory of `edgeconv train` or `edgeconv export`, phase by phase.

    python benchmarks/memory_profile.py train --data DIR --out RUN [any `edgeconv train` flags]
    python benchmarks/memory_profile.py export RUN --out BUNDLE [any `edgeconv export` flags]
    python benchmarks/memory_profile.py --json NAME.json train ...   (also writes benchmarks/results/NAME.json)

The command runs in this process with a hook around each function that makes up one of its
phases (decoding, loaders, the frozen base's ONNX Runtime sessions, training loops, parity
runs, calibration...). At every phase boundary the hook reads the kernel's peak-RSS counter
(VmHWM) and resets it (``/proc/self/clear_refs`` 5), so a phase's peak is exact, not sampled,
and includes the phases nested in it. The table lists each phase once (calls summed) in the
order first entered, indented by nesting: RSS when first entered, its peak, RSS after its last
call. Linux only. The reset also resets what `/usr/bin/time -v` reports for this process, so
measure a command's own peak with `/usr/bin/time -v edgeconv ...`, not through this script.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, table, write_json  # noqa: E402

# (function, phase name); a function the installed code does not have is skipped and listed
PHASES = {
    "train": [
        ("edgeconv.training.run:_train", "train (whole run)"),
        ("edgeconv.data:load_dataset", "decode images (load_dataset)"),
        ("edgeconv.training.loaders:InMemoryLoader.__init__", "loader: uint8 tensor"),
        ("edgeconv.models:create_model", "build model"),
        ("edgeconv.training.transfer:_Transfer.__init__", "cache the frozen base's features"),
        ("edgeconv.training.transfer:OrtFrozen.__init__", "frozen part -> ONNX + ORT session"),
        ("edgeconv.training.transfer:OrtFrozen.over_split", "frozen part over a split (cache)"),
        ("edgeconv.training.transfer:_Transfer.head_phase", "phase 1: head"),
        ("edgeconv.training.transfer:_Transfer.fine_tune_phase", "phase 2: top blocks"),
        ("edgeconv.training.transfer:_Transfer._unfreeze_top", "split + prefix session + cache"),
        ("edgeconv.training.scratch:train_scratch", "scratch training"),
        ("edgeconv.training.loop:fit", "fit (epochs)"),
        ("edgeconv.training.transfer:OrtFrozen.__call__", "frozen part on a batch (ORT)"),
        ("edgeconv.training.loop:evaluate", "evaluate"),
        ("edgeconv.training.transfer:_Transfer.score_test", "test figures"),
        ("edgeconv.training.run:_test_figures", "test figures"),
        ("edgeconv.checkpoint:save_checkpoint", "save checkpoint"),
        ("edgeconv.training.rundir:plot_history", "plots"),
        ("edgeconv.model_card:write_model_card", "model card"),
    ],
    "export": [
        ("edgeconv.exporting:export_run", "export (whole run)"),
        ("edgeconv.checkpoint:model_from_checkpoint", "rebuild model"),
        ("edgeconv.data:load_export_images", "decode parity + calibration images"),
        ("edgeconv.data:load_dataset", "decode images (load_dataset)"),
        ("edgeconv.data:load_images_recursive", "decode calibration folder"),
        ("edgeconv_runtime.preprocess:normalize", "normalise to float32"),
        ("edgeconv_export.bundle:export_bundle", "export_bundle"),
        ("edgeconv_export.bundle:torch_logits", "PyTorch reference logits"),
        ("edgeconv_export.onnx:export_onnx", "torch.onnx.export"),
        ("edgeconv_export.onnx:simplify", "onnxslim"),
        ("edgeconv_export.bundle:runtime_logits", "parity run (ORT)"),
        ("edgeconv_export.precision:convert_fp16", "FP16 conversion"),
        ("edgeconv_export.int8:collect_statistics", "INT8 calibration pass (streaming)"),
        ("edgeconv_export.int8:write_int8", "INT8 graph written"),
        ("edgeconv_export.precision:fit_to_budget", "INT8 graph judged (+ accuracy-aware)"),
    ],
}


def _status(key: str) -> int:
    """A /proc/self/status figure (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status (Linux only)")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


@dataclass
class Phase:
    name: str
    depth: int
    order: int
    calls: int = 0
    seconds: float = 0.0
    rss_in: int = 0
    peak: int = 0
    rss_out: int = 0


class Tracker:
    """Open phases form a stack; every boundary folds the peak since the last boundary into all of them."""

    def __init__(self):
        self.phases: dict = {}
        self.stack: list = []
        self.peak = _status("VmHWM")
        _reset_peak()

    def _boundary(self) -> None:
        hwm = _status("VmHWM")
        self.peak = max(self.peak, hwm)
        for p in self.stack:
            p.peak = max(p.peak, hwm)
        _reset_peak()

    def enter(self, name: str) -> Phase:
        self._boundary()
        p = self.phases.get(name)
        if p is None:
            p = self.phases[name] = Phase(name, len(self.stack), len(self.phases), rss_in=_status("VmRSS"))
        p.calls += 1
        self.stack.append(p)
        return p

    def leave(self, p: Phase, seconds: float) -> None:
        self._boundary()
        self.stack.pop()
        p.seconds += seconds
        p.rss_out = _status("VmRSS")

    def rows(self) -> list:
        mb = lambda b: round(b / 2**20)  # noqa: E731
        return [{"phase": "  " * p.depth + p.name, "calls": p.calls, "seconds": round(p.seconds, 1), "rss_in_mb": mb(p.rss_in),
                 "peak_mb": mb(p.peak), "rss_after_mb": mb(p.rss_out)} for p in sorted(self.phases.values(), key=lambda p: p.order)]


def _resolve(target: str):
    """(owner object, attribute name, function) for 'package.module:Class.attr', or None if absent."""
    mod_name, qual = target.split(":")
    try:
        owner = importlib.import_module(mod_name)
    except ImportError:
        return None
    *path, attr = qual.split(".")
    for part in path:
        owner = getattr(owner, part, None)
        if owner is None:
            return None
    fn = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr, None)
    return (owner, attr, fn) if callable(fn) else None


def _hooked(tracker: Tracker, name: str, fn):
    @functools.wraps(fn)
    def hooked(*args, **kwargs):
        p = tracker.enter(name)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            tracker.leave(p, time.perf_counter() - t0)

    hooked.memory_phase = name
    return hooked


def install(tracker: Tracker, targets: list) -> list:
    """Hook every target present; a module-level function is replaced wherever a loaded module bound it by name."""
    missing = []
    for target, name in targets:
        found = _resolve(target)
        if found is None:
            missing.append(target)
            continue
        owner, attr, fn = found
        if getattr(fn, "memory_phase", None):  # one class reached by two names
            continue
        hooked = _hooked(tracker, name, fn)
        setattr(owner, attr, hooked)
        if isinstance(owner, type):
            continue
        for mod in list(sys.modules.values()):
            if getattr(mod, "__name__", "").startswith(("edgeconv", "edgeconv_export", "edgeconv_runtime")) and getattr(mod, attr, None) is fn:
                setattr(mod, attr, hooked)
    return missing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="also write the table to benchmarks/results/NAME")
    ap.add_argument("command", choices=sorted(PHASES))
    ap.add_argument("args", nargs=argparse.REMAINDER, help="the flags of `edgeconv COMMAND`")
    args = ap.parse_args()
    from edgeconv.cli import cli

    tracker = Tracker()
    missing = install(tracker, PHASES[args.command])
    t0 = time.perf_counter()
    code = 0
    try:
        cli.main(args=[args.command, *args.args], standalone_mode=False)
    except SystemExit as exc:
        code = exc.code or 0
    tracker._boundary()
    wall = time.perf_counter() - t0
    rows = tracker.rows()
    print(f"\nedgeconv {args.command}: peak RSS {tracker.peak / 2**20:.0f} MB, {wall:.0f} s, exit {code}")
    print(table(rows, list(rows[0]) if rows else ["phase"]))
    if args.json:
        path = write_json(args.json, {"command": ["edgeconv", args.command, *args.args], "exit": code, "peak_rss_mb": round(tracker.peak / 2**20),
                                      "seconds": round(wall, 1), "phases": rows, "not_hooked": missing, "environment": environment()})
        print(f"wrote {path}")
    sys.exit(code)


if __name__ == "__main__":
    main()
