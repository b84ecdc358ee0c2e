"""Key figures for ``scripts/gpu_check.sh``: one short line per step, read from what the step wrote.

    python scripts/gpu_check_summary.py KIND PATH

KIND is verify (the JSON of ``verify --json``), bench (``bench --json``), train (a run directory),
export / engines (a bundle directory), pytest (a junit XML file), gpu / backends (JSON written by
the script), usable (backends JSON -> the usable names, one a line), versions (no PATH: the
installed packages that matter). Standard library only, Python 3.8+: it also runs on JetPack 5.
A figure that cannot be read prints "-": a missing figure never hides the step's own status.
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ENGINE_SUFFIXES = (".plan", ".engine", ".trt")


def _json(path: str):
    return json.loads(Path(path).read_text())


def verify(path: str) -> str:
    r = _json(path)
    figs = [f"max|diff| {r['max_abs_diff']:.2e}", f"cos {r['cosine_min']:.6f}", f"top-1 {r['top1_agreement']:.3f}"]
    if not r.get("ok", True) and r.get("problems"):
        figs.append("; ".join(r["problems"]))
    return ", ".join(figs)


def bench(path: str) -> str:
    r = _json(path)
    rows = {row["batch"]: row for row in r.get("rows", [])}
    if not rows:
        return "; ".join(s.get("reason", "") for s in r.get("skipped", [])) or "no rows"
    parts = []
    for b in sorted(rows):
        row = rows[b]
        parts.append(f"b{b} p50 {row['p50_ms']:.3f} ms ({row['throughput_ips']:.0f} img/s)")
    return ", ".join(parts)


def train(path: str) -> str:
    m = _json(str(Path(path) / "metrics.json"))
    acc = m.get("test_accuracy")
    acc = m.get("val_accuracy") if acc is None else acc
    figs = [f"test acc {acc:.4f}" if acc is not None else "no accuracy"]
    if m.get("epochs_run") is not None:
        figs.append(f"{m['epochs_run']} epoch(s)")
    if m.get("train_seconds") is not None:
        figs.append(f"train {m['train_seconds']:.1f} s")
    return ", ".join(figs)


def _artifacts(path: str, fmt: str) -> list:
    return [a for a in _json(str(Path(path) / "manifest.json")).get("artifacts", []) if a.get("format") == fmt]


def export(path: str) -> str:
    names = []
    for a in _artifacts(path, "onnx"):
        variant = a.get("variant", "default")
        names.append(a["precision"] + ("" if variant == "default" else f"/{variant}"))
    return "onnx " + ",".join(names) if names else "no onnx artifact"


def engines(path: str) -> str:
    arts = _artifacts(path, "tensorrt")
    if not arts:
        return "no engine in the manifest"
    side = {}
    engine = Path(path) / arts[0]["file"]
    if engine.with_suffix(".json").is_file():
        side = _json(str(engine.with_suffix(".json")))
    side = side or arts[0].get("details") or {}
    extra = f" (TensorRT {side.get('tensorrt_version')}, {side.get('gpu_name')})" if side.get("tensorrt_version") else ""
    return "tensorrt " + ",".join(a["precision"] for a in arts) + extra


def pytest(path: str) -> str:
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n, failed, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    text = f"{n - failed - errors - skipped} passed, {failed} failed, {skipped} skipped"
    return text + (f", {errors} error(s)" if errors else "")


def gpu(path: str) -> str:
    g = _json(path)
    if not g:
        return "no NVIDIA GPU found"
    cc = f", compute {g['compute_capability']}" if g.get("compute_capability") else ""
    driver = f", driver {g['driver']}" if g.get("driver") else ""
    return f"{g.get('name')}{cc}{driver}"


def backends(path: str) -> str:
    status = _json(path)
    usable = [name for name, (ok, _) in status.items() if ok]
    return "usable: " + (", ".join(usable) or "none")


def usable(path: str) -> str:
    return "\n".join(name for name, (ok, _) in _json(path).items() if ok)


def versions(_path: str = "") -> str:
    from importlib import metadata  # Python 3.8+

    figs = []
    for dist in ("torch", "onnxruntime", "onnxruntime-gpu", "tensorrt", "tensorrt-cu12", "tensorrt-cu13", "cuda-python"):
        try:
            figs.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(figs) or "-"


KINDS = {"verify": verify, "bench": bench, "train": train, "export": export, "engines": engines, "pytest": pytest, "gpu": gpu,
         "backends": backends, "usable": usable, "versions": versions}


def main(argv: list) -> int:
    if not argv or argv[0] not in KINDS:
        print(f"usage: gpu_check_summary.py {{{','.join(KINDS)}}} [PATH]", file=sys.stderr)
        return 2
    try:
        print(KINDS[argv[0]](argv[1] if len(argv) > 1 else ""))
    except Exception as exc:  # a figure we cannot read is shown as "-", with why, never a traceback in the table
        print(f"- ({type(exc).__name__})" if argv[0] != "usable" else "")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
