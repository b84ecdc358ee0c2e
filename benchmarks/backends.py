"""Runtime speed bars, measured as ratios in one run on this machine.

- runtime overhead: ``Model.run`` vs a bare ``onnxruntime.InferenceSession.run`` (same file,
  same session options, same input), batch 1: <= 5 % on efficientnet_lite0, <= 5 us on chollet_mnist;
- ONNX Runtime FP32 vs PyTorch eager at batch 1: >= 3.5x (lite0), >= 4x (mnist);
  INT8 vs FP32: >= 2x on lite0 (AVX-512 VNNI), reported honestly for mnist;
  the bundle's TensorRT INT8 graph (symmetric int8) on the CPU beside the CPU INT8 graph (uint8
  activations), bare sessions, batch 1: for the record of why CPUs get the uint8 graph;
- end-to-end from JPEG bytes (decode + preprocess + infer + softmax) vs model-only, lite0 FP32
  batch 1: <= 1.5x;
- cold start (fresh process: import, load bundle, predict one image) and its peak RSS;
- OpenVINO (f32, bf16, int8) beside ONNX Runtime (FP32, INT8) on efficientnet_lite0 at batch 1 and 32, same
  threads, alternating blocks, with top-1 agreement and max logit difference against ONNX Runtime FP32 on the
  1,000 cats_and_dogs_small test images (``--openvino`` runs only this part and adds it to backends.json).

    python benchmarks/backends.py --lite0-bundle B1 --mnist-bundle B2 [--lite0-run R1 --mnist-run R2]
    python benchmarks/backends.py --openvino --lite0-bundle B1

Without bundles it trains and exports small ones first (minutes).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, table, write_json  # noqa: E402

from edgeconv_runtime import Model  # noqa: E402
from edgeconv_runtime.bench import environment  # noqa: E402
from edgeconv_runtime.manifest import INT8_TENSORRT_ONNX  # noqa: E402


def paired(fa, fb, calls: int, rounds: int = 15) -> tuple:
    """Per-call seconds of ``fa`` and ``fb`` in alternating blocks, and the median of the per-round
    ratios fb/fa: adjacent blocks share the machine's state, so drift cancels out of the ratio.

    Blocks, not single calls: each engine keeps worker threads spin-waiting after a call, which
    would steal the cores from the other one; a pause before each block lets them park.
    """
    def block(fn):
        time.sleep(0.1)
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t) / calls

    block(fa), block(fb)  # warm-up
    ta, tb, ratios = [], [], []
    for _ in range(rounds):
        a, b = block(fa), block(fb)
        ta.append(a)
        tb.append(b)
        ratios.append(b / a)
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


def bare_session(model: Model, path=None):
    """A plain InferenceSession with the runtime's own session options, on ``path`` or the model's file."""
    import onnxruntime as ort

    sess = model.backend.session
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = model.backend.threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path or model.artifact), so, providers=["CPUExecutionProvider"]), sess.get_inputs()[0].name


def torch_model(run_dir: str):
    import torch

    from edgeconv.checkpoint import load_checkpoint, model_from_checkpoint

    torch.set_num_threads(2)
    m, _ = model_from_checkpoint(load_checkpoint(run_dir))
    return m


def _fresh_process(body: str, repeats: int) -> dict:
    """Run ``body`` in fresh interpreters; median wall time from start of imports, and peak RSS."""
    # peak RSS from VmHWM: ru_maxrss would count the parent's pages that the fork carried over
    code = "import time; t = time.perf_counter()\n" + body + (
        "dt = time.perf_counter() - t\n"
        "hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "print(dt, hwm / 1024)\n")
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
        runs.append((float(out[-2]), float(out[-1])))
    return {"cold_start_s_median": statistics.median(r[0] for r in runs), "peak_rss_mb_median": statistics.median(r[1] for r in runs)}


def cold_start(bundle: str, image: str) -> dict:
    return _fresh_process(
        "from edgeconv_runtime import Model\n"
        f"m = Model.load({bundle!r}); p = m.predict({image!r})\n"
        "import sys; assert 'torch' not in sys.modules\n", 5)


def cold_start_torch(run_dir: str, image: str) -> dict:
    return _fresh_process(
        "import torch\n"
        "from edgeconv.checkpoint import load_checkpoint, model_from_checkpoint\n"
        "from edgeconv_runtime.preprocess import preprocess_images\n"
        f"m, pre = model_from_checkpoint(load_checkpoint({run_dir!r}))\n"
        f"x = torch.from_numpy(preprocess_images([{image!r}], pre))\n"
        "with torch.inference_mode(): m(x).softmax(1)\n", 3)


def make_bundles(work: Path) -> dict:
    """Train and export small real models when none are given."""
    from edgeconv.exporting import ExportRequest, export_run
    from edgeconv.training import TrainConfig, train

    out = {}
    train(TrainConfig(data="mnist-5k", test_data=str(SHARED / "mnist"), model="chollet_mnist", epochs=3, optimizer="adam", lr=2e-3,
                      out=str(work / "mnist_run"), force=True, progress=False))
    export_run(ExportRequest(checkpoint=str(work / "mnist_run"), out=str(work / "mnist_bundle"), precisions=("fp32", "int8"), force=True))
    train(TrainConfig(data=str(SHARED / "cats_and_dogs_small"), model="efficientnet_lite0", strategy="feature-extract", epochs=10,
                      out=str(work / "lite0_run"), force=True, progress=False))
    export_run(ExportRequest(checkpoint=str(work / "lite0_run"), out=str(work / "lite0_bundle"), precisions=("fp32", "int8"), force=True))
    out.update(mnist_bundle=work / "mnist_bundle", mnist_run=work / "mnist_run", lite0_bundle=work / "lite0_bundle", lite0_run=work / "lite0_run")
    return {k: str(v) for k, v in out.items()}


def measure(name: str, bundle: str, run_dir: str, calls: int) -> dict:
    import torch

    ref = json.loads((Path(bundle) / "manifest.json").read_text())["reference"]
    x1 = np.load(Path(bundle) / ref["inputs"])[:1].astype(np.float32)
    jpeg = (Path(bundle) / ref["images"][0]).read_bytes()
    fp32 = Model.load(bundle, backend="onnxruntime-cpu", precision="fp32")  # ONNX Runtime's overhead: `auto` may pick OpenVINO
    int8 = Model.load(bundle, backend="onnxruntime-cpu", precision="int8")
    sess, in_name = bare_session(fp32)
    tm = torch_model(run_dir)
    xt = torch.from_numpy(x1)

    def eager():
        with torch.inference_mode():
            return tm(xt)

    bare, run, r_over = paired(lambda: sess.run(None, {in_name: x1}), lambda: fp32.run(x1), calls)
    run2, int8_t, r_int8 = paired(lambda: fp32.run(x1), lambda: int8.run(x1), calls)
    run3, eager_t, r_eager = paired(lambda: fp32.run(x1), eager, calls)
    run4, e2e, r_e2e = paired(lambda: fp32.run(x1), lambda: fp32.predict(jpeg, top_k=1), calls)
    t = {"bare_session": bare, "model_run_fp32": run, "model_run_int8": int8_t, "pytorch_eager": eager_t, "end_to_end_fp32": e2e,
         "fp32_beside_int8": run2, "fp32_beside_eager": run3, "fp32_beside_e2e": run4}
    r_trt = None
    if (Path(bundle) / INT8_TENSORRT_ONNX).is_file():  # bundles exported before issue 12 have no such graph
        cpu_graph, _ = bare_session(int8)
        trt_graph, _ = bare_session(int8, Path(bundle) / INT8_TENSORRT_ONNX)
        t["int8_cpu_graph_bare"], t["int8_tensorrt_graph_bare"], r_trt = paired(
            lambda: cpu_graph.run(None, {in_name: x1}), lambda: trt_graph.run(None, {in_name: x1}), calls)
    us = {k: v * 1e6 for k, v in t.items()}
    return {
        "model": name,
        "threads": fp32.backend.threads,
        "times_us": us,
        # each ratio: the median over rounds of adjacent alternating blocks
        "overhead_ratio": r_over,
        "overhead_us": us["bare_session"] * (r_over - 1),
        "ort_fp32_vs_eager_speedup": r_eager,
        "int8_vs_fp32_speedup": 1 / r_int8,
        "end_to_end_over_model_only": r_e2e,
        "int8_tensorrt_graph_over_cpu_graph_on_cpu": r_trt,
        "cold_start": cold_start(bundle, str(Path(bundle) / ref["images"][0])),
        "cold_start_pytorch": cold_start_torch(run_dir, str(Path(bundle) / ref["images"][0])),
    }


def interleaved(fns: dict, calls: int, rounds: int = 15) -> tuple:
    """Per-call seconds of each function, timed in blocks that take turns (one block each per round), and per
    round every function's time over the first one's: the median of those ratios is what compares them."""
    def block(fn):
        time.sleep(0.1)  # let the other engine's spinning threads park
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t) / calls

    for fn in fns.values():  # warm-up
        block(fn)
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(block(fn))
    base = next(iter(fns))
    ratios = {k: statistics.median(b / a for a, b in zip(times[base], times[k])) for k in fns}
    return {k: statistics.median(v) for k, v in times.items()}, ratios


# the side-by-side runs: (label, backend, precision); ONNX Runtime FP32 first, the baseline of every ratio
OPENVINO_RUNS = (("onnxruntime fp32", "onnxruntime-cpu", "fp32"), ("onnxruntime int8", "onnxruntime-cpu", "int8"),
                 ("openvino f32", "openvino-cpu", "fp32"), ("openvino bf16", "openvino-cpu", "bf16"), ("openvino int8", "openvino-cpu", "int8"))


def openvino_vs_onnxruntime(bundle: str, image_dir: Path, batches=(1, 32), rounds: int = 15) -> dict:
    """OpenVINO f32/bf16/int8 and ONNX Runtime FP32/INT8 on one bundle in one process: latency per batch size as
    ratios over ONNX Runtime FP32, agreement on real test images, and verify() against the bundle's reference."""
    from edgeconv_runtime.backends.openvino import bf16_status

    models, skipped = {}, {}
    for label, backend, precision in OPENVINO_RUNS:
        if precision == "bf16" and not bf16_status()[0]:
            skipped[label] = bf16_status()[1]
            continue
        models[label] = Model.load(bundle, backend=backend, precision=precision)
    base = models["onnxruntime fp32"]
    files = sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    x = base.preprocess_images([str(f) for f in files])
    labels = np.array([base.classes.index(f.parent.name) for f in files])
    out = {"model": base.bundle.name, "bundle": bundle, "threads": base.backend.threads, "images": len(files),
           "openvino": models["openvino f32"].describe().get("openvino"), "skipped": skipped, "latency_ms": {}, "vs_onnxruntime_fp32": {},
           "openvino_int8_vs_onnxruntime_int8": {}, "agreement": {}, "verify": {}}
    for b in batches:
        xb = np.ascontiguousarray(x[:b])
        calls = max(1, 16 // b)
        t, r = interleaved({k: (lambda m=m: m.run(xb)) for k, m in models.items()}, calls, rounds)
        out["latency_ms"][str(b)] = {k: v * 1e3 for k, v in t.items()}
        out["vs_onnxruntime_fp32"][str(b)] = {k: 1 / v for k, v in r.items()}  # > 1: faster than ONNX Runtime FP32
        if "openvino int8" in t:
            out["openvino_int8_vs_onnxruntime_int8"][str(b)] = r["onnxruntime int8"] / r["openvino int8"]
    ref = np.concatenate([base.run(x[i : i + 32]) for i in range(0, len(x), 32)])
    for k, m in models.items():
        got = np.concatenate([m.run(x[i : i + 32]) for i in range(0, len(x), 32)])
        out["agreement"][k] = {"top1_agreement_vs_ort_fp32": float((got.argmax(1) == ref.argmax(1)).mean()),
                               "max_abs_logit_diff_vs_ort_fp32": float(np.abs(got - ref).max()),
                               "accuracy": float((got.argmax(1) == labels).mean())}
        v = m.verify()
        out["verify"][k] = {key: v[key] for key in ("ok", "max_abs_diff", "cosine_min", "top1_agreement", "problems")}
    return out


def openvino_markdown(r: dict, env: dict) -> str:
    """The side-by-side table of backends.md: which engine is faster per precision and batch size here."""
    sizes = list(r["latency_ms"])
    head = ["engine / precision"] + [f"batch {b} ms (x ORT FP32)" for b in sizes] + ["top-1 agree", "max logit diff", "test acc", "verify"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for k in r["agreement"]:
        row = [k] + [f"{r['latency_ms'][b][k]:.1f} ({r['vs_onnxruntime_fp32'][b][k]:.2f}x)" for b in sizes]
        a = r["agreement"][k]
        row += [f"{a['top1_agreement_vs_ort_fp32']:.3f}", f"{a['max_abs_logit_diff_vs_ort_fp32']:.2g}", f"{a['accuracy']:.3f}",
                "ok" if r["verify"][k]["ok"] else "FAILED"]
        lines.append("| " + " | ".join(row) + " |")
    i8 = ", ".join(f"batch {b}: {v:.2f}x" for b, v in r["openvino_int8_vs_onnxruntime_int8"].items())
    return (f"# OpenVINO vs ONNX Runtime on the CPU, {r['model']}\n\n"
            f"One run, one process, {r['threads']} threads each, alternating blocks (ratios: median over 15 rounds of the adjacent "
            f"blocks). CPU: {env.get('cpu')} ({env.get('cores')} cores; {', '.join(f for f in env.get('cpu_flags', []) if 'bf16' in f or 'amx' in f or 'vnni' in f)}), "
            f"OpenVINO {r['openvino']}, ONNX Runtime {env.get('onnxruntime')}. Agreement on the {r['images']} cats_and_dogs_small "
            "test images against ONNX Runtime FP32; verify against the bundle's PyTorch reference with each precision's tolerance "
            "(bf16 takes FP16's).\n\n" + "\n".join(lines) + f"\n\nOpenVINO int8 over ONNX Runtime int8: {i8}.\n"
            + "".join(f"\nskipped {k}: {v}\n" for k, v in r["skipped"].items()))


def main_openvino(bundle: str) -> None:
    r = openvino_vs_onnxruntime(bundle, SHARED / "cats_and_dogs_small" / "test")
    env = environment(r["threads"])
    r["environment"] = env
    r["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    md = openvino_markdown(r, env)
    print(md)
    from _common import RESULTS
    from edgeconv_runtime.fileio import atomic_write_text

    path = RESULTS / "backends.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc["openvino_vs_onnxruntime"] = r  # the other sections keep their own run
    write_json("backends.json", doc)
    atomic_write_text(RESULTS / "backends.md", md)
    print(f"wrote {path} and {RESULTS / 'backends.md'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lite0-bundle")
    ap.add_argument("--lite0-run")
    ap.add_argument("--mnist-bundle")
    ap.add_argument("--mnist-run")
    ap.add_argument("--work", default="/tmp/edgeconv-bench-backends")
    ap.add_argument("--openvino", action="store_true", help="only OpenVINO vs ONNX Runtime on --lite0-bundle, added to backends.json")
    args = ap.parse_args()
    if args.openvino:
        if not args.lite0_bundle:
            ap.error("--openvino needs --lite0-bundle")
        main_openvino(args.lite0_bundle)
        return
    paths = {k: getattr(args, k) for k in ("lite0_bundle", "lite0_run", "mnist_bundle", "mnist_run")}
    if not all(paths.values()):
        paths = make_bundles(Path(args.work))
    results = [
        measure("chollet_mnist", paths["mnist_bundle"], paths["mnist_run"], calls=1000),
        measure("efficientnet_lite0", paths["lite0_bundle"], paths["lite0_run"], calls=20),
    ]
    targets = {"chollet_mnist": {"overhead_us": 5, "ort_fp32_vs_eager_speedup": 4.0},
               "efficientnet_lite0": {"overhead_ratio": 1.05, "ort_fp32_vs_eager_speedup": 3.5, "int8_vs_fp32_speedup": 2.0,
                                      "end_to_end_over_model_only": 1.5, "cold_start_s": 0.4, "peak_rss_mb": 120}}
    rows = []
    for r in results:
        t = r["times_us"]
        rows.append({
            "model": r["model"], "threads": r["threads"],
            "bare ORT -> Model.run us": f"{t['bare_session']:.1f} -> {t['model_run_fp32']:.1f} ({100 * (r['overhead_ratio'] - 1):+.1f} %, {r['overhead_us']:+.2f} us)",
            "eager vs ORT fp32 us": f"{t['pytorch_eager']:.1f} vs {t['fp32_beside_eager']:.1f} ({r['ort_fp32_vs_eager_speedup']:.2f}x)",
            "fp32 vs int8 us": f"{t['fp32_beside_int8']:.1f} vs {t['model_run_int8']:.1f} ({r['int8_vs_fp32_speedup']:.2f}x)",
            "e2e vs model us": f"{t['end_to_end_fp32']:.1f} vs {t['fp32_beside_e2e']:.1f} ({r['end_to_end_over_model_only']:.2f}x)",
            "int8 cpu vs trt graph us": (f"{t['int8_cpu_graph_bare']:.1f} vs {t['int8_tensorrt_graph_bare']:.1f} "
                                         f"({r['int8_tensorrt_graph_over_cpu_graph_on_cpu']:.2f}x)" if "int8_cpu_graph_bare" in t else "-"),
            "cold s / peak MB": f"{r['cold_start']['cold_start_s_median']:.3f} / {r['cold_start']['peak_rss_mb_median']:.0f}",
            "torch cold s / MB": f"{r['cold_start_pytorch']['cold_start_s_median']:.2f} / {r['cold_start_pytorch']['peak_rss_mb_median']:.0f}",
        })
    print(table(rows, list(rows[0])))
    print("targets:", json.dumps(targets))
    from _common import RESULTS

    old = RESULTS / "backends.json"
    doc = json.loads(old.read_text()) if old.is_file() else {}  # keep the sections other runs wrote (--openvino)
    doc.update(results=results, targets=targets, environment=environment(2))
    path = write_json("backends.json", doc)
    print(f"wrote {path}")
    from edgeconv_runtime.backends.openvino import openvino_status

    if openvino_status()[0]:
        main_openvino(paths["lite0_bundle"])


if __name__ == "__main__":
    main()
