"""INT8's cheap fixes on the ImageNet EfficientNet-Lite0 import: how many calibration images, per-channel or per-tensor weights.

    python benchmarks/int8_cheap_fixes.py --work W

W is a `benchmarks/int8_quality.py --imagenet --work W` folder: its `imagenet_bundle` (the `edgeconv import` bundle),
`calib_photos` and `val_photos`. Each row writes the `cpu` recipe from percentile ranges with no node kept in float, on
the first N calibration photos (the last rows add --extra photos, real training photos the bundle never saw, in two
evenly spaced picks: how much the choice of photos matters against their number), and scores
top-1 agreement with FP32 on every validation photo. Writes benchmarks/results/int8_cheap_fixes.json and .md.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

from _common import RESULTS, SHARED, cpu_meta, table, write_json

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "runtime"), str(ROOT / "export")]


@contextlib.contextmanager
def per_tensor_weights():
    """A context in which ONNX Runtime's quantize_static writes per-tensor weights (write_int8 asks for per-channel)."""
    import onnxruntime.quantization as oq

    real = oq.quantize_static
    oq.quantize_static = lambda *a, **k: real(*a, **{**k, "per_channel": False})
    try:
        yield
    finally:
        oq.quantize_static = real


def main() -> None:
    from edgeconv_export.bundle import runtime_logits
    from edgeconv_export.int8 import RECIPES
    from edgeconv_export.precision import Int8Writer
    from edgeconv_runtime.bundle import read_bundle
    from edgeconv_runtime.preprocess import preprocess_images

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--sizes", default="50,100,200", help="calibration photos per row, from the work folder's calib_photos")
    ap.add_argument("--extra", type=Path, default=SHARED / "cats_and_dogs_small" / "train", help="more real photos for the last row")
    ap.add_argument("--extra-count", type=int, default=300)
    ap.add_argument("--extra-offsets", type=lambda v: [int(o) for o in v.split(",")], default=[0, 3],
                    help="one row per offset: evenly spaced --extra photos starting there (how much the pick matters)")
    args = ap.parse_args()
    bundle = args.work / "imagenet_bundle"
    pre = read_bundle(bundle).preprocess
    calib = preprocess_images(sorted((args.work / "calib_photos").iterdir()), pre)
    val = preprocess_images(sorted((args.work / "val_photos").iterdir()), pre)
    pool = sorted(p for p in args.extra.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    step = max(1, len(pool) // args.extra_count)
    picks = [pool[o::step][: args.extra_count] for o in args.extra_offsets if o < step]  # evenly spaced, each from another offset
    ref = runtime_logits(bundle / "model.onnx", val).argmax(1)
    rows = []
    plan = [(int(n), calib[: int(n)], False) for n in args.sizes.split(",")]
    plan.append((len(calib), calib, True))
    for i, files in enumerate(picks):
        plan.append((f"{len(calib)} + {len(files)} (pick {i + 1})", np.concatenate([calib, preprocess_images(files, pre)]), False))
    with tempfile.TemporaryDirectory(prefix="int8cheap.") as tmp:
        tmp = Path(tmp)
        writer, last_n = None, None
        for n, x, per_tensor in plan:
            t0 = time.time()
            if n != last_n:  # the per-tensor row reuses the ranges of the row on the same photos, when there is one
                if writer is not None:
                    writer.close()
                writer, last_n = Int8Writer(bundle / "model.onnx", x, "percentile", tmp), n
            with per_tensor_weights() if per_tensor else contextlib.nullcontext():
                writer.write(tmp / "g.onnx", RECIPES["cpu"])
            agree = float((runtime_logits(tmp / "g.onnx", val).argmax(1) == ref).mean())
            rows.append({"calibration photos": n, "weights": "per-tensor" if per_tensor else "per-channel",
                         "top-1 agreement %": round(100 * agree, 1), "seconds": round(time.time() - t0, 1)})
            print(rows[-1], flush=True)
        writer.close()
    meta = {"date": str(date.today()), **cpu_meta(), "validation_photos": len(val), "recipe": "cpu",
            "ranges": "percentile", "float_nodes": 0, "extra_photos": f"{args.extra_count} evenly spaced from {args.extra}, {len(picks)} picks"}
    write_json("int8_cheap_fixes.json", {"meta": meta, "rows": rows})
    md = (f"# INT8 cheap fixes, ImageNet EfficientNet-Lite0 ({meta['date']}, VNNI: {meta['vnni']})\n\n"
          f"cpu recipe, percentile ranges, no float node; top-1 agreement with FP32 on {len(val)} photos. The last rows add "
          f"{meta['extra_photos']}.\n\n" + table(rows, ["calibration photos", "weights", "top-1 agreement %", "seconds"]) + "\n")
    (RESULTS / "int8_cheap_fixes.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
