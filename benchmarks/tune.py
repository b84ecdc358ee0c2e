"""`tune` against what a user has without it, side by side in one run on this machine (issue 25).

For efficientnet_lite0 (feature-extract on cats_and_dogs_small, FP32 + INT8) and chollet_mnist (FP32 + FP16 + INT8):
1. `edgeconv-runtime tune` for latency (batch 1) and for throughput (batch 1, 8, 32), each into a copy of the bundle
   (lite0 judged on 200 real test photos, mnist on the bundle's reference inputs); its wall time recorded;
2. then, in alternating rounds (every contestant once per round, rounds in rotating order; a contestant's figure is
   the median of its rounds), at batch 1 (p50 latency) and batch 32 (images/s):
   - tuned: Model.load(bundle) running the profile tune wrote;
   - auto: Model.load(bundle, profile=False): today's fixed order (ONNX Runtime FP32);
   - bare ONNX Runtime: InferenceSession with default SessionOptions, on model.onnx and on model.int8.onnx;
   - OpenVINO with its own hints: compile_model(..., {"PERFORMANCE_HINT": "LATENCY" | "THROUGHPUT"}) on the same two
     files; THROUGHPUT runs a batch the way OpenVINO intends (split over its optimal number of infer requests, run
     at once in an AsyncInferQueue);
   every contestant on the same model files, the same images, in the same process.
Writes benchmarks/results/tune.json and tune.md; prints the table last.

    .venv/bin/python benchmarks/tune.py [--lite0 BUNDLE] [--mnist BUNDLE] [--rounds 7]

Without --lite0/--mnist the bundles are trained and exported into --work first (lite0 ~2 min, mnist ~1 min on 2 cores).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, SHARED, RESULTS, table, write_json  # noqa: E402

EDGECONV = [sys.executable, "-m", "edgeconv"]
RUNTIME = [sys.executable, "-m", "edgeconv_runtime"]


def build(work: Path) -> dict:
    """Train and export the two bundles (only when not passed in)."""
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    jobs = {
        "efficientnet_lite0": (["train", "--data", str(SHARED / "cats_and_dogs_small"), "--model", "efficientnet_lite0", "--strategy",
                                "feature-extract", "--seed", "0"], "fp32,int8"),
        "chollet_mnist": (["train", "--data", "mnist-5k", "--model", "chollet_mnist", "--epochs", "2", "--seed", "0"], "fp32,fp16,int8"),
    }
    for name, (train, precision) in jobs.items():
        run, bundle = work / f"{name}_run", work / f"{name}_bundle"
        if not (bundle / "manifest.json").exists():
            subprocess.run([*EDGECONV, *train, "--out", str(run), "--force"], check=True)
            subprocess.run([*EDGECONV, "export", str(run), "--out", str(bundle), "--precision", precision, "--force"], check=True)
        out[name] = bundle
    return out


def tune(bundle: Path, objective: str, data, work: Path) -> tuple:
    """A copy of ``bundle`` tuned for ``objective``: (copy, tune JSON, wall seconds)."""
    dst = work / f"{bundle.name}.{objective}"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(bundle, dst)
    js = work / f"{bundle.name}.{objective}.tune.json"
    cmd = [*RUNTIME, "tune", str(dst), "--objective", objective, "--batch-sizes", "1" if objective == "latency" else "1,8,32",
           "--json", str(js), "--max-images", "200"] + (["--data", str(data)] if data else [])
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"tune failed on {dst}: {r.stderr.strip().splitlines()[-1]}")
    print(r.stdout.strip().splitlines()[-1])
    import json

    return dst, json.loads(js.read_text()), wall


class Bare:
    """ONNX Runtime as a user starts it: InferenceSession(path) with default SessionOptions."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.name = self.session.get_inputs()[0].name

    def run(self, x):
        return self.session.run(None, {self.name: x})[0]

    def close(self):
        self.session = None


class OpenVino:
    """OpenVINO as its documentation has a user start it: compile_model with a performance hint; THROUGHPUT runs a
    batch split over the compiled model's optimal number of infer requests, all at once (AsyncInferQueue)."""

    def __init__(self, path: Path, hint: str):
        import openvino as ov

        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", {"PERFORMANCE_HINT": hint})
        self.n = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")) if hint == "THROUGHPUT" else 1
        self.queue = ov.AsyncInferQueue(self.compiled, self.n)
        self.out = {}
        self.queue.set_callback(lambda req, i: self.out.__setitem__(i, req.get_output_tensor(0).data.copy()))
        self.request = self.compiled.create_infer_request()

    def run(self, x):
        if self.n == 1 or len(x) == 1:
            self.request.infer({0: x})
            return self.request.get_output_tensor(0).data.copy()
        bounds = np.linspace(0, len(x), min(self.n, len(x)) + 1).astype(int)
        self.out.clear()
        for i in range(len(bounds) - 1):
            self.queue.start_async({0: x[bounds[i]:bounds[i + 1]]}, userdata=i)
        self.queue.wait_all()
        return np.concatenate([self.out[i] for i in range(len(bounds) - 1)])

    def close(self):
        self.compiled = self.queue = self.request = None


def contestants(bundle: Path, tuned_bundle: Path) -> dict:
    from edgeconv_runtime import Model

    out = {}
    tuned = Model.load(tuned_bundle)
    out[f"tuned: {tuned.info['profile']['description'].split(': ', 1)[1]}"] = tuned
    out["auto (today, no profile)"] = Model.load(bundle, profile=False)
    for precision, file in (("fp32", "model.onnx"), ("int8", "model.int8.onnx")):
        out[f"bare ONNX Runtime {precision}"] = Bare(bundle / file)
        out[f"OpenVINO LATENCY {precision}"] = OpenVino(bundle / file, "LATENCY")
        out[f"OpenVINO THROUGHPUT {precision}"] = OpenVino(bundle / file, "THROUGHPUT")
    return out


def measure(models: dict, x: np.ndarray, batch: int, rounds: int, slice_s: float) -> dict:
    """name -> median over rounds of each round's median seconds per call, alternating every round."""
    xb = np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])))
    names = list(models)
    per = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        if r % 2:
            order.reverse()
        for n in order:
            run = models[n].run
            for _ in range(3):
                run(xb)
            times, end = [], time.perf_counter() + slice_s
            while len(times) < 3 or time.perf_counter() < end:
                t = time.perf_counter()
                run(xb)
                times.append(time.perf_counter() - t)
            per[n].append(float(np.median(times)))
    return {n: float(np.median(v)) for n, v in per.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lite0", type=Path, default=None, help="an efficientnet_lite0 feature-extract bundle with FP32 + INT8")
    ap.add_argument("--mnist", type=Path, default=None, help="a chollet_mnist bundle")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "edgeconv_tune_bench")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--slice-s", type=float, default=0.4)
    args = ap.parse_args()
    bundles = {"efficientnet_lite0": args.lite0, "chollet_mnist": args.mnist}
    if not all(bundles.values()):
        built = build(args.work)
        bundles = {k: v or built[k] for k, v in bundles.items()}
    args.work.mkdir(parents=True, exist_ok=True)
    from edgeconv_runtime.bench import environment
    from edgeconv_runtime.bundle import read_bundle

    rows, tunes = [], []
    load_start = os.getloadavg()[0]
    for name, bundle in bundles.items():
        bundle = Path(bundle)
        data = SHARED / "cats_and_dogs_small" / "test" if name == "efficientnet_lite0" else None
        x = read_bundle(bundle).reference_tensors()[0]
        for objective, batch in (("latency", 1), ("throughput", 32)):
            tuned_bundle, result, wall = tune(bundle, objective, data, args.work)
            tunes.append({"model": name, "objective": objective, "tune_wall_s": round(wall, 1), "tune_seconds": result["seconds"],
                          "candidates": len(result["rows"]), "chosen": result["chosen"]["config"], "chosen_backend": result["chosen"]["backend"],
                          "chosen_precision": result["chosen"]["precision"], "chosen_batch": result["chosen"]["batch"],
                          "chosen_accuracy": result["chosen"]["accuracy"], "chosen_agreement": result["chosen"]["agreement"]})
            models = contestants(bundle, tuned_bundle)
            try:
                secs = measure(models, x, batch, args.rounds, args.slice_s)
            finally:
                for m in models.values():
                    m.close()
            tuned_key = next(k for k in secs if k.startswith("tuned"))
            peers = {k: v for k, v in secs.items() if not k.startswith(("tuned", "auto"))}
            best_peer = min(peers, key=peers.get)
            for k, s in secs.items():
                rows.append({"model": name, "objective": objective, "batch": batch, "contestant": k, "p50_ms": round(s * 1e3, 4),
                             "images_per_s": round(batch / s, 1), "tuned_speedup": round(s / secs[tuned_key], 3),
                             "best_peer": k == best_peer})
            print(f"{name} {objective}: tuned {secs[tuned_key] * 1e3:.3f} ms; auto {secs['auto (today, no profile)'] * 1e3:.3f} ms; "
                  f"best peer {best_peer} {peers[best_peer] * 1e3:.3f} ms", flush=True)
    summary = []
    for name in bundles:
        for objective, batch in (("latency", 1), ("throughput", 32)):
            rs = [r for r in rows if r["model"] == name and r["objective"] == objective]
            tuned = next(r for r in rs if r["contestant"].startswith("tuned"))
            auto = next(r for r in rs if r["contestant"].startswith("auto"))
            best = next(r for r in rs if r["best_peer"])
            t = next(t for t in tunes if t["model"] == name and t["objective"] == objective)
            summary.append({"model": name, "objective": f"{objective} (batch {batch})", "tuned": tuned["contestant"][7:],
                            "tuned ms": tuned["p50_ms"], "auto ms": auto["p50_ms"], "best peer": best["contestant"], "peer ms": best["p50_ms"],
                            "tuned/auto speed": round(auto["p50_ms"] / tuned["p50_ms"], 2),
                            "tuned/best peer speed": round(best["p50_ms"] / tuned["p50_ms"], 2), "tune s": t["tune_wall_s"]})
    env = environment()
    result = {"environment": env, "cpu_class": __import__("edgeconv_runtime.cpuclass", fromlist=["cpu_class"]).cpu_class(),
              "loadavg_1m": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)}, "rounds": args.rounds,
              "slice_s": args.slice_s, "tunes": tunes, "rows": rows, "summary": summary}
    write_json("tune.json", result)
    cols = list(summary[0])
    md = [f"# tune against auto, bare ONNX Runtime and OpenVINO's hints ({env.get('cpu')}, {env.get('cores')} cores, {result['cpu_class']}; "
          f"load {result['loadavg_1m']['start']} -> {result['loadavg_1m']['end']})", "",
          "ms: p50 per call at that batch (median over alternating rounds); speed ratios > 1: tuned is faster.", "",
          table(summary, cols), "", "## every contestant", "", table(rows, list(rows[0])), "", "## tune runs", "", table(tunes, list(tunes[0]))]
    (RESULTS / "tune.md").write_text("\n".join(md) + "\n")
    print(table(summary, cols))


if __name__ == "__main__":
    main()
