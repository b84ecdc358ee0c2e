"""What checking a whole bundle costs on cold start: `Model.load` with check_hash on vs off (issue 24 §3).

Since issue 24 a bundle is checked when it is opened: the manifest digest, the kind of every file (lstat), the
list of files, and (check_hash on) the sha256 of every artifact and reference file, whatever precision is asked.
This times `Model.load(bundle, precision=P)` three ways, alternating, with the process's hash cache emptied before
each load (what a fresh process pays; the files themselves are in the page cache every time): check_hash off; on
with every file hashed (the first start after a copy or an export); on as a restart, where the stamps (path, size,
mtime, ctime, inode) that an earlier process recorded in the verify cache spare the hashing. It reports the
medians and the differences in percent.

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


def measure(bundle: Path, runs: int, precision: str, threads: int) -> dict:
    """Three ways, alternating: check_hash off; on, every file hashed (a first start after a copy); on, a restart
    (the stamps earlier processes recorded in the verify cache: lstat only)."""
    import os

    from edgeconv_runtime import Model
    from edgeconv_runtime import bundle as bundle_mod

    cache = Path(tempfile.mkdtemp(prefix="verify_cache_"))
    os.chmod(cache, 0o700)
    Model.load(bundle, precision=precision, threads=threads).close()  # warm the page cache and the imports
    modes = {"off": (False, "off"), "first": (True, "off"), "restart": (True, str(cache))}
    os.environ[bundle_mod.VERIFY_CACHE_ENV] = str(cache)
    bundle_mod._verified.clear()
    Model.load(bundle, precision=precision, threads=threads).close()  # records the stamps (files older than RACY_SECONDS)
    times = {m: [] for m in modes}
    for _ in range(runs):
        for mode, (check, env) in modes.items():
            os.environ[bundle_mod.VERIFY_CACHE_ENV] = env
            bundle_mod._verified.clear()  # what a fresh process starts with
            t0 = time.perf_counter()
            m = Model.load(bundle, precision=precision, threads=threads, check_hash=check)
            times[mode].append(time.perf_counter() - t0)
            m.close()
    # the checks alone (read_bundle: what Model.load adds before the backend starts), far less noisy than whole loads
    opens = {m: [] for m in modes}
    for _ in range(runs):
        for mode, (check, env) in modes.items():
            os.environ[bundle_mod.VERIFY_CACHE_ENV] = env
            bundle_mod._verified.clear()
            t0 = time.perf_counter()
            bundle_mod.read_bundle(bundle, check_hash=check)
            opens[mode].append(time.perf_counter() - t0)
    shutil.rmtree(cache, ignore_errors=True)
    hashed = sum((bundle / rel).stat().st_size for rel in bundle_mod.read_bundle(bundle, check_hash=False).listed())
    med = {m: statistics.median(t) for m, t in times.items()}
    off = med["off"]
    return {"bundle": str(bundle), "precision": precision, "runs": runs, "threads": threads, "bytes_hashed": hashed,
            "load_s_check_hash_off": round(off, 4), "load_s_first_start": round(med["first"], 4), "load_s_restart": round(med["restart"], 4),
            "first_start_cost_pct": round(100 * (med["first"] - off) / off, 1), "restart_cost_pct": round(100 * (med["restart"] - off) / off, 1),
            "open_ms": {m: round(1000 * statistics.median(t), 1) for m, t in opens.items()},
            "loadavg_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
            "all_s": {m: [round(x, 4) for x in t] for m, t in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", nargs="?", default=None)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args()
    bundle = Path(args.bundle) if args.bundle else DEFAULT_BUNDLE
    if not (bundle / "manifest.json").is_file():
        if args.bundle:
            sys.exit(f"error: {bundle} is not a bundle")
        print(f"building an efficientnet_lite0 bundle in {bundle} ...", flush=True)
        build_lite0(bundle)
    r = measure(bundle, args.runs, args.precision, args.threads)
    print(f"{bundle.name}: {r['bytes_hashed'] / 1e6:.1f} MB listed; Model.load({args.precision}) median of {r['runs']} "
          f"(load average {r['loadavg_1min']} on {r['cpus']} CPUs): check_hash off {1000 * r['load_s_check_hash_off']:.0f} ms; "
          f"on, every file hashed (first start) {1000 * r['load_s_first_start']:.0f} ms ({r['first_start_cost_pct']:+.1f} %); "
          f"on, a restart (verify cache) {1000 * r['load_s_restart']:.0f} ms ({r['restart_cost_pct']:+.1f} %)")
    o = r["open_ms"]
    print(f"the checks alone (read_bundle, median): check_hash off {o['off']} ms, first start {o['first']} ms, restart {o['restart']} ms; "
          f"as a share of the check_hash-off load: first start {100 * (o['first'] - o['off']) / (1000 * r['load_s_check_hash_off']):+.1f} %, "
          f"restart {100 * (o['restart'] - o['off']) / (1000 * r['load_s_check_hash_off']):+.1f} %")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
