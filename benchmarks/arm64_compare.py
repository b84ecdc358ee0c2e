"""The two x86-side steps of ``arm64_check.sh`` (issue 12, section 4).

    python benchmarks/arm64_compare.py images OUT_DIR [--jpegs 50] [--digits 50]
        real test images: JPEGs from cats_and_dogs_small/test (half cats, half dogs) and PNG digits
        written from the official MNIST t10k set, each folder with a ``list.txt`` (path<TAB>label)

    python benchmarks/arm64_compare.py compare --x86 DIR --arm64 DIR [--times TSV] [--command CMD]
        compares what both machines wrote (preprocessed tensors, logits, verify and predict JSON),
        prints a table and writes benchmarks/results/arm64_check.json and .md; exit 1 if the check fails
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, SHARED, table, write_json  # noqa: E402

from edgeconv_runtime.fileio import atomic_write_text  # noqa: E402

BUNDLES = ("mnist", "lite0")
PRECISIONS = ("fp32", "int8")


# ---------------------------------------------------------------------------------------------- images
def write_images(out: Path, jpegs: int, digits: int) -> None:
    """Copy real JPEGs and write real MNIST digits as PNGs; byte-identical inputs for both machines."""
    from PIL import Image

    jpeg_dir, digit_dir = out / "jpeg", out / "digits"
    jpeg_dir.mkdir(parents=True, exist_ok=True)
    digit_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    test = SHARED / "cats_and_dogs_small" / "test"
    per_class = {"cats": (jpegs + 1) // 2, "dogs": jpegs // 2}
    for folder, n in per_class.items():
        for src in sorted((test / folder).glob("*.jpg"))[:n]:
            (jpeg_dir / src.name).write_bytes(src.read_bytes())
            lines.append(f"{src.name}\t{folder}")
    (jpeg_dir / "list.txt").write_text("\n".join(lines) + "\n")

    mnist = SHARED / "mnist"
    with gzip.open(mnist / "t10k-images-idx3-ubyte.gz", "rb") as f:
        pixels = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(mnist / "t10k-labels-idx1-ubyte.gz", "rb") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    lines = []
    for i in range(digits):
        name = f"t10k_{i:05d}.png"
        Image.fromarray(pixels[i], mode="L").save(digit_dir / name)
        lines.append(f"{name}\t{int(labels[i])}")
    (digit_dir / "list.txt").write_text("\n".join(lines) + "\n")
    print(f"{len(list(jpeg_dir.glob('*.jpg')))} JPEGs in {jpeg_dir}, {digits} MNIST t10k digits in {digit_dir}")


# ---------------------------------------------------------------------------------------------- compare
def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return float(cos.min())


def _top1(prediction: dict) -> str:
    """Top-1 label of one `predict --json` entry ({"top": [{"label": ...}]}, or the older {"labels": [...]})."""
    return prediction["top"][0]["label"] if "top" in prediction else prediction["labels"][0]


def _labels(images_dir: Path) -> list:
    return [line.split("\t")[1] for line in (images_dir / "list.txt").read_text().splitlines() if line.strip()]


def output_step(onnx_path: Path):
    """Scale of the DequantizeLinear that makes the graph's output, i.e. one INT8 step of the logits
    (None when onnx is missing or the output is not dequantized): INT8 kernels of two CPUs may round
    one requantization differently, so a difference of exactly one step is expected."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        return None
    graph = onnx.load(str(onnx_path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    node = producer.get(graph.output[0].name)
    if node is None or node.op_type != "DequantizeLinear" or node.input[1] not in inits:
        return None
    return float(numpy_helper.to_array(inits[node.input[1]]).max())


def compare_bundle(name: str, x86: Path, arm: Path, images: Path, bundle_dir: Path) -> dict:
    """Tensor-by-tensor comparison of one bundle's probe, verify and predict outputs."""
    px, pa = np.load(x86 / name / "preprocessed.npy"), np.load(arm / name / "preprocessed.npy")
    labels = _labels(images)
    row = {"bundle": name, "images": int(len(px)), "preprocess_shape": list(px.shape),
           "preprocess_max_abs_diff": float(np.abs(px.astype(np.float64) - pa).max()) if px.shape == pa.shape else None,
           "preprocess_bit_identical": bool(px.shape == pa.shape and px.tobytes() == pa.tobytes())}
    for p in PRECISIONS:
        lx, la = np.load(x86 / name / f"logits.{p}.npy"), np.load(arm / name / f"logits.{p}.npy")
        r = {"top1_identical": int((lx.argmax(1) == la.argmax(1)).sum()), "n": int(len(lx)),
             "max_abs_logit_diff": float(np.abs(lx.astype(np.float64) - la).max()),
             "cosine_min": _cosine_min(lx, la)}
        # the CLI path too: `predict --json` top-1 label per image on each machine
        jx, ja = _load_json(x86 / f"predict.{name}.{p}.json"), _load_json(arm / f"predict.{name}.{p}.json")
        if jx and ja:
            tx, ta = [_top1(d) for d in jx], [_top1(d) for d in ja]
            r["predict_cli_top1_identical"] = sum(a == b for a, b in zip(tx, ta))
            r["predict_cli_n"] = len(tx)
            r["accuracy_x86"] = sum(t == l for t, l in zip(tx, labels)) / len(labels)
            r["accuracy_arm64"] = sum(t == l for t, l in zip(ta, labels)) / len(labels)
        for side, d in (("x86", x86), ("arm64", arm)):
            v = _load_json(d / f"verify.{name}.{p}.json")
            r[f"verify_{side}"] = ({k: v.get(k) for k in ("ok", "max_abs_diff", "cosine_min", "top1_agreement", "preprocess_max_abs_diff", "n",
                                                          "problems")} if isinstance(v, dict) else None)
        r["artifact_x86"], r["artifact_arm64"] = (((_load_json(d / name / "probe.json") or {}).get("artifacts") or {}).get(p) for d in (x86, arm))
        step = output_step(bundle_dir / r["artifact_x86"]) if p == "int8" and r["artifact_x86"] == r["artifact_arm64"] else None
        if step:
            r["output_step"] = step
            r["max_abs_logit_diff_in_steps"] = round(r["max_abs_logit_diff"] / step, 3)
        row[p] = r
    return row


def read_times(path: Path | None) -> dict:
    times = {}
    if path and path.is_file():
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 3:
                times[parts[0]] = {"seconds": round(float(parts[1]), 1), "status": parts[2]}
    return times


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def compare(args) -> int:
    x86, arm = Path(args.x86), Path(args.arm64)
    bundle_root = Path(args.bundles) if args.bundles else x86.parent / "bundles"
    bundles = [compare_bundle(b, x86, arm, Path(args.images) / ("digits" if b == "mnist" else "jpeg"), bundle_root / b) for b in BUNDLES]
    versions = {side: (_load_json(d / "lite0" / "probe.json") or {}).get("versions") for side, d in (("x86", x86), ("arm64", arm))}
    timings = {side: read_times(d / "timings.tsv") for side, d in (("x86", x86), ("arm64", arm))}
    phases = read_times(Path(args.times) if args.times else None)

    checks = {
        "preprocessing_bit_identical": all(b["preprocess_bit_identical"] for b in bundles),
        "top1_identical": all(b[p]["top1_identical"] == b[p]["n"] for b in bundles for p in PRECISIONS),
        "predict_cli_top1_identical": all(b[p].get("predict_cli_n") == b[p]["n"] and b[p].get("predict_cli_top1_identical") == b[p]["n"]
                                          for b in bundles for p in PRECISIONS),
        "verify_ok_both": all((b[p][f"verify_{s}"] or {}).get("ok") is True for b in bundles for p in PRECISIONS for s in ("x86", "arm64")),
    }
    summary = {
        "preprocess_max_abs_diff": max(b["preprocess_max_abs_diff"] if b["preprocess_max_abs_diff"] is not None else float("inf") for b in bundles),
        "fp32_max_abs_logit_diff": max(b["fp32"]["max_abs_logit_diff"] for b in bundles),
        "int8_max_abs_logit_diff": max(b["int8"]["max_abs_logit_diff"] for b in bundles),
        "fp32_cosine_min": min(b["fp32"]["cosine_min"] for b in bundles),
        "int8_cosine_min": min(b["int8"]["cosine_min"] for b in bundles),
        "top1_identical": f"{sum(b[p]['top1_identical'] for b in bundles for p in PRECISIONS)}/{sum(b[p]['n'] for b in bundles for p in PRECISIONS)}",
    }
    result = {"ok": all(checks.values()), "checks": checks, "summary": summary, "bundles": bundles, "versions": versions,
              "phases_seconds": phases, "command_seconds": timings, "command": args.command,
              "note": "arm64 = Debian bookworm aarch64 root run through qemu-user-static on this x86 machine; "
                      "CPU backend onnxruntime-cpu, same threads on both sides; timings under emulation say nothing about ARM speed"}

    rows = []
    for b in bundles:
        for p in PRECISIONS:
            r = b[p]
            graph = r["artifact_x86"] if r["artifact_x86"] == r["artifact_arm64"] else f"{r['artifact_x86']} / {r['artifact_arm64']}"
            rows.append({"bundle": b["bundle"], "precision": p, "graph": graph or "-", "images": r["n"],
                         "preproc max|diff|": fmt(b["preprocess_max_abs_diff"], ".1e"),
                         "top-1 same": f"{r['top1_identical']}/{r['n']}",
                         "CLI top-1 same": f"{r.get('predict_cli_top1_identical', '-')}/{r.get('predict_cli_n', '-')}",
                         "max|logit diff|": fmt(r["max_abs_logit_diff"], ".2e")
                         + (f" ({r['max_abs_logit_diff_in_steps']:g} step{'' if r['max_abs_logit_diff_in_steps'] == 1 else 's'})" if "max_abs_logit_diff_in_steps" in r else ""),
                         "cosine min": fmt(r["cosine_min"], ".6f"),
                         "acc x86/arm64": f"{fmt(r.get('accuracy_x86'), '.3f')}/{fmt(r.get('accuracy_arm64'), '.3f')}",
                         "verify x86/arm64": "/".join("ok" if (r[f"verify_{s}"] or {}).get("ok") else "FAIL" for s in ("x86", "arm64"))})
    columns = list(rows[0])
    # `verify` on each machine: the bundle's reference inputs against PyTorch's outputs saved at export
    verify_rows = [{"bundle": b["bundle"], "precision": p, "side": side, "ok": v.get("ok"), "n": v.get("n"),
                    "max|diff| vs PyTorch": fmt(v.get("max_abs_diff"), ".2e"), "cosine min": fmt(v.get("cosine_min"), ".6f"),
                    "top-1 agree": v.get("top1_agreement"), "preproc max|diff|": fmt(v.get("preprocess_max_abs_diff"), ".1e")}
                   for b in bundles for p in PRECISIONS for side in ("x86", "arm64") for v in [b[p][f"verify_{side}"] or {}]]
    vrows = [{"side": s, **{k: (versions[s] or {}).get(k, "?") for k in ("machine", "python", "onnxruntime", "numpy", "pillow")}} for s in versions]
    prows = [{"phase": k, "seconds": v["seconds"], "status": v["status"]} for k, v in phases.items()]
    text = "\n\n".join([table(rows, columns), table(verify_rows, list(verify_rows[0])), table(vrows, list(vrows[0])), table(prows, ["phase", "seconds", "status"]) if prows else ""])
    print(text)
    print(f"\narm64 check {'PASSED' if result['ok'] else 'FAILED'}: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in checks.items()))

    path = write_json(f"{args.name}.json", result)
    md = (f"# ARM64 under emulation vs x86 (issue 12, section 4)\n\n`{args.command}`\n\n{result['note']}.\n\n"
          f"**{'PASSED' if result['ok'] else 'FAILED'}**: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in checks.items())
          + f"\n\n{text}\n")
    atomic_write_text(RESULTS / f"{args.name}.md", md)
    print(f"wrote {path} and {RESULTS / (args.name + '.md')}")
    return 0 if result["ok"] else 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="step", required=True)
    sp = sub.add_parser("images")
    sp.add_argument("out")
    sp.add_argument("--jpegs", type=int, default=50)
    sp.add_argument("--digits", type=int, default=50)
    sp = sub.add_parser("compare")
    sp.add_argument("--x86", required=True, help="x86 side's output folder")
    sp.add_argument("--arm64", required=True, help="aarch64 side's output folder")
    sp.add_argument("--images", required=True, help="folder with jpeg/ and digits/ (for labels)")
    sp.add_argument("--times", help="phase timings (name<TAB>seconds<TAB>status)")
    sp.add_argument("--bundles", help="folder with mnist/ and lite0/ (default: next to --x86)")
    sp.add_argument("--command", default="benchmarks/arm64_check.sh")
    sp.add_argument("--name", default="arm64_check", help="results file name under benchmarks/results (NAME.json, NAME.md)")
    a = p.parse_args()
    if a.step == "images":
        write_images(Path(a.out), a.jpegs, a.digits)
        return
    sys.exit(compare(a))


if __name__ == "__main__":
    main()
