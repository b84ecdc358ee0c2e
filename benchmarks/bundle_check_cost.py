"""What checking a whole bundle costs on cold start: `Model.load` with check_hash on vs off (issue 24 §3).

Since issue 24 a bundle is checked when it is opened: the manifest digest, the kind of every file (lstat), the
list of files, and (check_hash on) the sha256 of every artifact and reference file, whatever precision is asked.
This times `Model.load(bundle, precision=P)` four ways, alternating, with the process's hash cache emptied before
each load (what a fresh process pays; the files themselves are in the page cache every time): check_hash off; on
with every file hashed (the first start after a copy or an export): the graph to load checked before the backend
reads it, the other files (other precisions, reference tensors) on a background thread while ONNX Runtime builds
its session, joined before Model.load returns; the same with every hash done before the backend starts (how
Model.load ran the check before); on as a restart, where the stamps (path, size, mtime, ctime, inode) that an
earlier process recorded in the verify cache spare the hashing. It reports the medians, the differences in
percent, the CPU time of each load (all threads: overlapping makes the hashing no less work, so on a machine with
no idle core it costs what it did), and the same three ways for whole processes (interpreter start, imports,
Model.load: what predict or serve waits for before it is ready).

    python benchmarks/bundle_check_cost.py [BUNDLE] [--runs 9] [--json benchmarks/results/bundle_check_cost.json]

Without BUNDLE it builds one the size of a real deployment: efficientnet_lite0 (one epoch of feature extraction
on real cats and dogs from $EDGECONV_DATA) exported FP32, FP16 and INT8, kept in /tmp/edgeconv_lite0_bundle.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_BUNDLE = Path(tempfile.gettempdir()) / "edgeconv_lite0_bundle"


def build_lite0(out: Path) -> Path:
    from _common import SHARED  # the data folder the benchmarks share ($EDGECONV_DATA)
    from edgeconv.exporting import ExportRequest, export_run
    from edgeconv.training import TrainConfig, train

    src = SHARED / "cats_and_dogs_small"
    work = Path(tempfile.mkdtemp(prefix="lite0_"))
    tiny = work / "data"
    for split, n in {"train": 40, "validation": 16, "test": 16}.items():
        for cls in ("cats", "dogs"):
            (tiny / split / cls).mkdir(parents=True)
            for f in sorted((src / split / cls).iterdir())[:n]:
                shutil.copy(f, tiny / split / cls / f.name)
    run = work / "run"
    train(TrainConfig(data=str(tiny), model="efficientnet_lite0", strategy="feature-extract", epochs=1, out=str(run), progress=False))
    export_run(ExportRequest(checkpoint=str(run), out=str(out), precisions=("fp32", "fp16", "int8"), calib_size=64, force=True))
    shutil.rmtree(work, ignore_errors=True)
    return out


def _process_load(bundle: Path, precision: str, check: bool, cache_env: str) -> tuple:
    """(wall, CPU) seconds of a Python process that loads the model and exits (interpreter start and imports
    included: what `predict` or `serve` pays before it is ready); CPU: user + system of all its threads."""
    import os
    import resource
    import subprocess

    code = ("import time; t0 = time.perf_counter(); from edgeconv_runtime import Model; "
            f"Model.load({str(bundle)!r}, precision={precision!r}, check_hash={check!r}).close(); print(time.perf_counter() - t0)")
    env = dict(os.environ, **{"EDGECONV_VERIFY_CACHE": cache_env})
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure(bundle: Path, runs: int, precision: str, threads: int, process_runs: int = 0) -> dict:
    """Four ways, alternating: check_hash off; on, every file hashed (a first start after a copy), all but the graph
    to load hashed while ONNX Runtime starts (Model.load now); the same hashed before the backend starts
    (read_bundle hashing at once: Model.load before); on, a restart (the stamps earlier processes recorded in the
    verify cache: lstat only). Wall time and the process's CPU time (all threads) of each load."""
    import os

    from edgeconv_runtime import Model
    from edgeconv_runtime import bundle as bundle_mod
    from edgeconv_runtime import model as model_mod

    cache = Path(tempfile.mkdtemp(prefix="verify_cache_"))
    os.chmod(cache, 0o700)
    Model.load(bundle, precision=precision, threads=threads).close()  # warm the page cache and the imports
    deferred = model_mod.read_bundle

    def at_once(*args, **kwargs):  # the check as Model.load ran it before: every hash done before the backend starts
        kwargs["defer_hashes"] = False
        return deferred(*args, **kwargs)

    modes = {"off": (False, "off", deferred), "first": (True, "off", deferred), "first_sequential": (True, "off", at_once),
             "restart": (True, str(cache), deferred)}
    os.environ[bundle_mod.VERIFY_CACHE_ENV] = str(cache)
    bundle_mod._verified.clear()
    Model.load(bundle, precision=precision, threads=threads).close()  # records the stamps (files older than RACY_SECONDS)
    times = {m: [] for m in modes}
    cpu = {m: [] for m in modes}
    try:
        for _ in range(runs):
            for mode, (check, env, reader) in modes.items():
                os.environ[bundle_mod.VERIFY_CACHE_ENV] = env
                model_mod.read_bundle = reader
                bundle_mod._verified.clear()  # what a fresh process starts with
                c0, t0 = time.process_time(), time.perf_counter()
                m = Model.load(bundle, precision=precision, threads=threads, check_hash=check)
                times[mode].append(time.perf_counter() - t0)
                cpu[mode].append(time.process_time() - c0)
                m.close()
    finally:
        model_mod.read_bundle = deferred
    # the checks alone (read_bundle hashing at once), far less noisy than whole loads
    opens = {m: [] for m in ("off", "first", "restart")}
    for _ in range(runs):
        for mode in opens:
            check, env, _ = modes[mode]
            os.environ[bundle_mod.VERIFY_CACHE_ENV] = env
            bundle_mod._verified.clear()
            t0 = time.perf_counter()
            bundle_mod.read_bundle(bundle, check_hash=check)
            opens[mode].append(time.perf_counter() - t0)
    # whole processes: interpreter start, imports, Model.load (what `edgeconv-runtime predict` or `serve` waits for)
    procs = {m: [] for m in ("off", "first", "restart")}
    proc_cpu = {m: [] for m in procs}
    for _ in range(process_runs):
        for mode in procs:
            check, env, _ = modes[mode]
            wall, used = _process_load(bundle, precision, check, env)
            procs[mode].append(wall)
            proc_cpu[mode].append(used)
    shutil.rmtree(cache, ignore_errors=True)
    hashed = sum((bundle / rel).stat().st_size for rel in bundle_mod.read_bundle(bundle, check_hash=False).listed())
    med = {m: statistics.median(t) for m, t in times.items()}
    off = med["off"]
    pct = {m: round(100 * (med[m] - off) / off, 1) for m in med}
    out = {"bundle": str(bundle), "precision": precision, "runs": runs, "threads": threads, "bytes_hashed": hashed,
           "load_s_check_hash_off": round(off, 4), "load_s_first_start": round(med["first"], 4),
           "load_s_first_start_sequential": round(med["first_sequential"], 4), "load_s_restart": round(med["restart"], 4),
           "first_start_cost_pct": pct["first"], "first_start_sequential_cost_pct": pct["first_sequential"],
           "restart_cost_pct": pct["restart"],
           "load_cpu_s": {m: round(statistics.median(t), 4) for m, t in cpu.items()},
           "open_ms": {m: round(1000 * statistics.median(t), 1) for m, t in opens.items()},
           "loadavg_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
           "all_s": {m: [round(x, 4) for x in t] for m, t in times.items()}}
    if process_runs:
        pmed = {m: statistics.median(t) for m, t in procs.items()}
        cmed = {m: statistics.median(t) for m, t in proc_cpu.items()}
        out["process"] = {"runs": process_runs, "median_s": {m: round(v, 4) for m, v in pmed.items()},
                          "first_start_cost_pct": round(100 * (pmed["first"] - pmed["off"]) / pmed["off"], 1),
                          "restart_cost_pct": round(100 * (pmed["restart"] - pmed["off"]) / pmed["off"], 1),
                          "cpu_s": {m: round(v, 4) for m, v in cmed.items()},
                          "first_start_cpu_cost_pct": round(100 * (cmed["first"] - cmed["off"]) / cmed["off"], 1),
                          "all_s": {m: [round(x, 4) for x in t] for m, t in procs.items()}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", nargs="?", default=None)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--process-runs", type=int, default=5, help="whole-process cold starts per mode (0: none)")
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args()
    bundle = Path(args.bundle) if args.bundle else DEFAULT_BUNDLE
    if not (bundle / "manifest.json").is_file():
        if args.bundle:
            sys.exit(f"error: {bundle} is not a bundle")
        print(f"building an efficientnet_lite0 bundle in {bundle} ...", flush=True)
        build_lite0(bundle)
    r = measure(bundle, args.runs, args.precision, args.threads, args.process_runs)
    ms = {k: 1000 * r[f"load_s_{k}"] for k in ("check_hash_off", "first_start", "first_start_sequential", "restart")}
    print(f"{bundle.name}: {r['bytes_hashed'] / 1e6:.1f} MB listed; Model.load({args.precision}) median of {r['runs']} "
          f"(load average {r['loadavg_1min']} on {r['cpus']} CPUs): check_hash off {ms['check_hash_off']:.0f} ms; "
          f"on, every file hashed (first start) {ms['first_start']:.0f} ms ({r['first_start_cost_pct']:+.1f} %), "
          f"hashed before the backend starts (as before) {ms['first_start_sequential']:.0f} ms ({r['first_start_sequential_cost_pct']:+.1f} %); "
          f"on, a restart (verify cache) {ms['restart']:.0f} ms ({r['restart_cost_pct']:+.1f} %)")
    c = r["load_cpu_s"]
    print("CPU time of a load (all threads, median): " + ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in c.items()))
    o = r["open_ms"]
    print(f"the checks alone (read_bundle hashing at once, median): check_hash off {o['off']} ms, first start {o['first']} ms, restart {o['restart']} ms")
    if "process" in r:
        p = r["process"]
        print(f"whole process (start, imports, Model.load), median of {p['runs']}: " + ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in p["median_s"].items())
              + f"; first start {p['first_start_cost_pct']:+.1f} %, restart {p['restart_cost_pct']:+.1f} %; CPU time "
              + ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in p["cpu_s"].items()) + f" (first start {p['first_start_cpu_cost_pct']:+.1f} %)")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
