"""Fast feature extraction speed: decode + resize + the frozen EfficientNet-Lite0 base over every
image of cats_and_dogs_small (4,000), as `edgeconv train --strategy feature-extract` runs it
(frozen base on ONNX Runtime). Beside it, the plain PyTorch eager loop at batch 64 on a sample.

    python benchmarks/feature_extraction.py [--data ../shared/data/cats_and_dogs_small] [--eager-sample 256]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, environment, table, write_json  # noqa: E402

from edgeconv.data import inspect_source, load_dataset  # noqa: E402
from edgeconv.models import create_model  # noqa: E402
from edgeconv.models import build_preprocess  # noqa: E402
from edgeconv.training.transfer import FeatureNet, OrtFrozen  # noqa: E402
from edgeconv_runtime.preprocess import normalize  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(SHARED / "cats_and_dogs_small"))
    ap.add_argument("--eager-sample", type=int, default=256)
    args = ap.parse_args()
    t0 = time.perf_counter()
    info = inspect_source(args.data)
    pre = build_preprocess("efficientnet_lite0", info, None)
    ds = load_dataset(args.data, pre, info=info)
    t_decode = time.perf_counter() - t0
    model = create_model("efficientnet_lite0", num_classes=2, in_channels=3, input_size=pre.size).eval()
    t1 = time.perf_counter()
    base = OrtFrozen(FeatureNet(model), pre.input_shape)
    t_export = time.perf_counter() - t1
    t2 = time.perf_counter()
    n = 0
    for split in (ds.train, ds.val, ds.test):
        feats = base.over_split(split, pre)
        n += len(feats)
    t_forward = time.perf_counter() - t2
    total = time.perf_counter() - t0
    # PyTorch eager, batch 64, on a sample (the whole set takes minutes)
    torch.set_num_threads(2)
    x = normalize(ds.train.pixels[: args.eager_sample], pre)
    fnet = FeatureNet(model).eval()
    t3 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(x), 64):
            fnet(torch.from_numpy(x[i : i + 64]))
    eager_ips = len(x) / (time.perf_counter() - t3)
    rows = [{"images": n, "decode+resize s": f"{t_decode:.1f}", "export base s": f"{t_export:.1f}", "ORT forward s": f"{t_forward:.1f}",
             "total s": f"{total:.1f}", "images/s": f"{n / total:.0f}", "eager forward images/s": f"{eager_ips:.0f}",
             "eager est. total s": f"{t_decode + n / eager_ips:.0f}"}]
    print(table(rows, list(rows[0])))
    print(f"target: <= 30 s for the {n} images")
    write_json("feature_extraction.json", {"images": n, "decode_s": t_decode, "export_s": t_export, "forward_s": t_forward, "total_s": total,
                                           "eager_images_per_s": eager_ips, "environment": environment()})


if __name__ == "__main__":
    main()
