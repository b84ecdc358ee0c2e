"""Runs in each environment of ``arm64_check.sh`` (x86 venv, aarch64 root under qemu): for one bundle
and one list of images, save the preprocessed tensors, the logits of each precision and the library
versions, so ``arm64_compare.py`` can compare the two machines tensor by tensor.

    python arm64_probe.py BUNDLE IMAGE_LIST --out DIR [--precisions fp32,int8] [--threads 1]

IMAGE_LIST holds one ``relative/path<TAB>label`` per line, relative to the list's folder.
Needs only the runtime (numpy, onnxruntime, pillow): it runs on the device side too.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from edgeconv_runtime import Model


def versions() -> dict:
    import PIL
    import onnxruntime

    import edgeconv_runtime

    return {"machine": platform.machine(), "python": platform.python_version(), "numpy": np.__version__,
            "onnxruntime": onnxruntime.__version__, "pillow": PIL.__version__,
            "edgeconv_runtime": getattr(edgeconv_runtime, "__version__", "")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("image_list")
    p.add_argument("--out", required=True)
    p.add_argument("--precisions", default="fp32,int8")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    listing = Path(a.image_list)
    images = [str(listing.parent / line.split("\t")[0]) for line in listing.read_text().splitlines() if line.strip()]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds, artifacts = {}, {}
    x = None
    for precision in a.precisions.split(","):
        t0 = time.perf_counter()
        model = Model.load(a.bundle, backend="onnxruntime-cpu", precision=precision, threads=a.threads)
        if x is None:  # preprocessing does not depend on the precision
            x = model.preprocess_images(images)
            np.save(out / "preprocessed.npy", x)
        np.save(out / f"logits.{precision}.npy", model.run(x))
        artifacts[precision] = Path(model.artifact).name  # which graph this machine's backend picked
        model.close()
        seconds[precision] = time.perf_counter() - t0
    (out / "probe.json").write_text(json.dumps({"versions": versions(), "n": len(images), "artifacts": artifacts, "seconds": seconds}, indent=2))


if __name__ == "__main__":
    main()
