"""Foreign models, broken weights and sources that end early: what other frameworks' exports, diverged training runs,
interrupted copies and stalled cameras hand edgeconv. Each gets a clear one-line error (or, for a batch axis declared
-1, a working import), never a traceback, a hang or a silent exit 0.

The models are real: a small torch network exported with torch.onnx.export, then edited with the onnx API the way
other exporters write them; parity, calibration and streams run on real cats_and_dogs_small photos.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

SIZE = 32
NORM = ["--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"]


def cli(module: str, *args, timeout: float = 300, code: str | None = None):
    """``python -m MODULE args`` (or ``python -c CODE args``), as a user runs it; a hang fails the test at ``timeout``."""
    head = ["-c", code] if code else ["-m", module]
    return subprocess.run([sys.executable, *head, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def one_line_error(r, needle: str) -> None:
    assert r.returncode != 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr[-3000:]
    assert needle in r.stderr, r.stderr


def _module():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=2), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 2)).eval()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A plain torch.onnx.export of a small convnet (fixed batch 1, input `input.1`), and a labels file."""
    import torch

    root = tmp_path_factory.mktemp("foreign")
    path = root / "plain.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_module(), (torch.zeros(1, 3, SIZE, SIZE),), str(path), opset_version=17, dynamo=False)
    (root / "labels.txt").write_text("cats\ndogs\n")
    return path


def edited(src: Path, out: Path, edit) -> Path:
    import onnx

    m = onnx.load(str(src))
    edit(m)
    onnx.save(m, str(out))
    return out


def _batch_dim(value: int):
    def edit(m):
        for vi in [*m.graph.input, *m.graph.output]:
            d = vi.type.tensor_type.shape.dim[0]
            d.Clear()
            d.dim_value = value

    return edit


def _poison(value: float, count: int = 3):
    def edit(m):
        from onnx import numpy_helper

        w = next(t for t in m.graph.initializer if t.dims and len(t.dims) == 4)  # the first conv's weight
        a = numpy_helper.to_array(w).copy()
        a.flat[:count] = value
        w.CopyFrom(numpy_helper.from_array(a, w.name))

    return edit


def _spatial(h: int | None, w: int | None):
    def edit(m):
        if h is None:
            _batch_dim(-1)(m)
        dims = m.graph.input[0].type.tensor_type.shape.dim
        for d, v in ((dims[2], h), (dims[3], w)):
            d.Clear()
            if v is None:
                d.dim_param = "side"
            else:
                d.dim_value = v

    return edit


# ---------------------------------------------------------------------------------------------- import: batch axis -1 / 0
@pytest.mark.parametrize("value", [-1, 0])
def test_import_batch_axis_declared_minus_one_or_zero_is_dynamic(source, catsdogs_dir, tmp_path, value):
    """TensorFlow converters write dim_value -1 (some 0) for "any batch": imported as dynamic, calibrated INT8 included."""
    import onnxruntime as ort

    src = edited(source, tmp_path / f"batch{value}.onnx", _batch_dim(value))
    out = tmp_path / "bundle"
    r = cli("edgeconv", "import", src, "--out", out, "--labels", source.parent / "labels.txt", *NORM,
            "--calib-data", catsdogs_dir / "train", "--calib-size", 40, "--val-data", catsdogs_dir / "validation", "--val-size", 24,
            "--precision", "fp32,int8", "--max-accuracy-drop", 100)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["input"]["shape"] == ["batch", 3, SIZE, SIZE] and m["source"]["input"]["shape"] == f"[?, 3, {SIZE}, {SIZE}]"
    for precision in ("fp32", "int8"):
        v = cli("edgeconv_runtime", "verify", out, "--precision", precision)
        assert v.returncode == 0 and v.stdout.startswith("verify OK"), v.stdout + v.stderr
    # the bundle answers like the unedited source, one image at a time
    from edgeconv_runtime import Model

    files = sorted((catsdogs_dir / "test" / "cats").iterdir())[:3]
    with Model.load(out, backend="onnxruntime-cpu") as model:
        x = model.preprocess_images(files)
        got = model.run(x)
    sess = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    want = np.concatenate([sess.run(None, {"input.1": x[i : i + 1]})[0] for i in range(len(x))])
    np.testing.assert_allclose(got, want, atol=1e-4)


# ---------------------------------------------------------------------------------------------- non-finite weights
@pytest.mark.parametrize("value,word", [(float("nan"), "3 NaN"), (float("inf"), "3 inf")])
def test_import_refuses_non_finite_weights_before_calibration(source, catsdogs_dir, tmp_path, value, word):
    src = edited(source, tmp_path / "broken.onnx", _poison(value))
    out = tmp_path / "bundle"
    t0 = time.perf_counter()
    r = cli("edgeconv", "import", src, "--out", out, "--labels", source.parent / "labels.txt", *NORM,
            "--calib-data", catsdogs_dir / "train", "--calib-size", 40, "--val-data", catsdogs_dir / "validation", "--val-size", 24,
            "--precision", "fp32,int8", "--max-accuracy-drop", 100)
    one_line_error(r, "broken.onnx has non-finite weights: '0.weight' holds")
    assert f"holds {word} among its 216 values" in r.stderr and "retrain" in r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == [src]
    print(f"\n{r.stderr.strip()} ({time.perf_counter() - t0:.1f} s)")


@pytest.mark.parametrize("value, word", [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_export_refuses_a_checkpoint_with_nan_weights(catsdogs_tiny, tmp_path, value, word):
    """`edgeconv export` of a run whose weights went NaN or inf (a diverged run): one line at the FP32 graph, before INT8
    calibration (inf weights used to print warnings and go on)."""
    import torch

    from edgeconv.checkpoint import save_checkpoint
    from edgeconv.models import create_model
    from edgeconv_runtime.preprocess import Preprocess

    torch.manual_seed(0)
    model = create_model("chollet_mnist", num_classes=2, in_channels=3, input_size=(SIZE, SIZE))
    with torch.no_grad():
        p = next(p for p in model.parameters() if p.ndim == 4)
        p.view(-1)[:5] = value
    pre = Preprocess(size=(SIZE, SIZE), channels=3)
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / "model.pt", model, {"model": {"name": "chollet_mnist", "kwargs": {}}, "classes": ["cats", "dogs"],
                                              "preprocess": pre.to_dict(), "data": {"source": str(catsdogs_tiny / "train")}})
    out = tmp_path / "bundle"
    r = cli("edgeconv", "export", run, "--out", out, "--precision", "fp32,int8", "--val-data", catsdogs_tiny / "validation",
            "--calib-data", catsdogs_tiny / "train", "--calib-size", 40)
    one_line_error(r, "has non-finite weights: ")
    assert f"holds 5 {word} among its" in r.stderr and not out.exists()


# ---------------------------------------------------------------------------------------------- absurd declared sizes
def test_import_refuses_an_absurd_declared_input_at_once(source, catsdogs_dir, tmp_path):
    """[1, 3, 1000000, 1000000]: refused before any image is resized to it (it used to grind for 300 s); --size too."""
    huge = edited(source, tmp_path / "huge.onnx", _spatial(1000000, 1000000))
    common = ["--labels", source.parent / "labels.txt", *NORM, "--val-data", catsdogs_dir / "validation", "--val-size", 24,
              "--precision", "fp32"]
    t0 = time.perf_counter()
    r = cli("edgeconv", "import", huge, "--out", tmp_path / "a", *common, timeout=90)
    one_line_error(r, "input 'input.1' declares [1, 3, 1000000, 1000000]: 1000000 x 1000000 pixels, over the 8192-pixel side")
    assert time.perf_counter() - t0 < 60 and not (tmp_path / "a").exists()
    dynamic = edited(source, tmp_path / "dynamic.onnx", _spatial(None, None))
    r = cli("edgeconv", "import", dynamic, "--out", tmp_path / "b", *common, "--size", "20000,20000", timeout=90)
    one_line_error(r, "--size 20000,20000 makes input 'input.1' [?, 3, 20000, 20000]")
    assert "pass a smaller --size" in r.stderr and not (tmp_path / "b").exists()


def test_bench_refuses_an_absurd_plain_graph_at_once(source, catsdogs_dir, tmp_path):
    """`edgeconv-runtime bench FILE.onnx` (the plain-ONNX path), with random inputs and with --data images."""
    from edgeconv_runtime.plain import MAX_INPUT_SIDE

    huge = edited(source, tmp_path / "huge.onnx", _spatial(1000000, 1000000))
    for extra in ([], ["--data", catsdogs_dir / "validation"]):
        t0 = time.perf_counter()
        r = cli("edgeconv_runtime", "bench", huge, "--iterations", 2, *extra, timeout=90)
        one_line_error(r, f"huge.onnx: the graph declares an input of [1, 3, 1000000, 1000000]: 1000000 x 1000000 pixels, "
                          f"over the {MAX_INPUT_SIDE}-pixel side")
        assert time.perf_counter() - t0 < 60
    dynamic = edited(source, tmp_path / "dynamic.onnx", _spatial(None, None))
    r = cli("edgeconv_runtime", "bench", dynamic, "--shape", f"3,{MAX_INPUT_SIDE + 1},64", "--iterations", 2, timeout=90)
    one_line_error(r, "--shape asks for")
    r = cli("edgeconv_runtime", "bench", dynamic, "--shape", "3,4096,4096", "--iterations", 2, "--batch-sizes", "1,32", timeout=90)
    one_line_error(r, "pass smaller --batch-sizes")  # one item fits; 32 of them (6.4 GB of float32 values a call) do not
    r = cli("edgeconv_runtime", "bench", dynamic, "--shape", f"3,{SIZE},{SIZE}", "--iterations", 2, "--batch-sizes", "1", timeout=120)
    assert r.returncode == 0, r.stderr  # a sane size still runs


# ---------------------------------------------------------------------------------------------- streams that end early
FRAME = (96, 96)


def _cv2():
    return pytest.importorskip("cv2", reason="streams need OpenCV: pip install opencv-python-headless (in the dev extra)")


@pytest.fixture(scope="module")
def bundle(source, catsdogs_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("stream") / "bundle"
    r = cli("edgeconv", "import", source, "--out", out, "--labels", source.parent / "labels.txt", *NORM,
            "--val-data", catsdogs_dir / "validation", "--val-size", 16, "--precision", "fp32")
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def photos(catsdogs_dir):
    """Real test photos at the video's frame size, BGR (OpenCV's order)."""
    cv2 = _cv2()
    files = [f for cls in ("cats", "dogs") for f in sorted((catsdogs_dir / "test" / cls).iterdir())[:10]]
    return [cv2.resize(cv2.imread(str(f)), FRAME, interpolation=cv2.INTER_AREA) for f in files]


def write_avi(path: Path, frames_bgr, hold: int = 3) -> Path:
    cv2 = _cv2()
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, FRAME)
    assert w.isOpened(), "OpenCV cannot write MJPG here"
    for f in frames_bgr:
        for _ in range(hold):
            w.write(f)
    w.release()
    return path


def test_truncated_avi_keeps_its_frames_and_exits_non_zero(bundle, photos, tmp_path):
    full = write_avi(tmp_path / "full.avi", photos)  # 60 frames
    data = full.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])  # an interrupted copy: header and index say 60 frames
    r = cli("edgeconv_runtime", "predict", bundle, "--source", full, "--json", timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr  # the complete file still ends cleanly
    assert json.loads(r.stdout.splitlines()[-1])["summary"]["frames"] == 60
    r = cli("edgeconv_runtime", "predict", bundle, "--source", cut, "--json", timeout=120)
    one_line_error(r, f"{cut} ended after ")
    assert "of the 60 frames its container declares: the video is truncated or damaged" in r.stderr
    lines = r.stdout.splitlines()
    summary = json.loads(lines[-1])["summary"]
    frames = [json.loads(l) for l in lines[:-1]]
    assert 20 <= len(frames) < 60 and [f["frame"] for f in frames] == list(range(len(frames)))  # what was read is kept
    assert summary["frames"] == len(frames) and summary["frame_count"] == 60 and summary["problem"] in r.stderr
    assert r.returncode == 1
    # every=2 reaches the cut through grab(); the plain-text summary says it ended early
    r = cli("edgeconv_runtime", "predict", bundle, "--source", cut, "--every", 2, timeout=120)
    assert r.returncode == 1 and "truncated or damaged" in r.stderr and ", ended early]" in r.stdout.splitlines()[-1]
    # the Python API: every frame read is handed out, then the iteration says why there are no more
    from edgeconv_runtime import Model
    from edgeconv_runtime.stream import SourceEndedEarly

    got = []
    with Model.load(bundle) as model, model.stream(cut, batch=4) as stream:
        with pytest.raises(SourceEndedEarly, match="truncated or damaged"):
            for p in stream:
                got.append(p.frame)
        assert got == list(range(len(frames))) and stream.summary()["problem"]


class _StallingCamera(BaseHTTPRequestHandler):
    """An IP camera's MJPEG stream (multipart/x-mixed-replace) that sends some frames, then stops sending (not closing)."""

    frames: list = []
    release = threading.Event()

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        try:
            for jpg in self.frames:
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg) + jpg + b"\r\n")
            self.wfile.flush()
        except OSError:
            return
        self.release.wait(60)  # the stall: the connection stays open, nothing more comes


@pytest.fixture
def stalling_camera(photos):
    cv2 = _cv2()
    _StallingCamera.frames = [cv2.imencode(".jpg", f)[1].tobytes() for f in photos[:8]]
    _StallingCamera.release = threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StallingCamera)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/video.mjpg"
    finally:
        _StallingCamera.release.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_http_stream_that_stalls_exits_non_zero_after_its_frames(bundle, stalling_camera):
    from edgeconv_runtime.stream import READ_TIMEOUT_MS

    t0 = time.perf_counter()
    r = cli("edgeconv_runtime", "predict", bundle, "--source", stalling_camera, "--json", timeout=READ_TIMEOUT_MS / 1000 + 90)
    took = time.perf_counter() - t0
    one_line_error(r, f"{stalling_camera} stalled: no frame for ")
    assert r.returncode == 1 and "check the camera or server and the network" in r.stderr
    lines = r.stdout.splitlines()
    frames, summary = [json.loads(l) for l in lines[:-1]], json.loads(lines[-1])["summary"]
    assert [f["frame"] for f in frames] == list(range(8)) and summary["frames"] == 8 and summary["problem"] in r.stderr
    assert took < READ_TIMEOUT_MS / 1000 + 60
    print(f"\nstalled stream: {r.stderr.strip()} ({took:.1f} s)")


# ---------------------------------------------------------------------------------------------- bf16 on a CPU without it
NO_BF16_CPU = ("import sys; import edgeconv_runtime.backends.openvino as ov; "
               "ov.cpu_flags = lambda: {'fpu', 'sse4_2', 'avx2', 'avx512f'}; "  # an AVX-512 CPU without AVX-512 BF16 or AMX
               "from edgeconv_runtime.cli import main; main(sys.argv[1:])")


def test_bf16_on_a_cpu_without_it_is_one_short_line(bundle, catsdogs_dir, monkeypatch):
    pytest.importorskip("openvino", reason="the [openvino] extra is not installed")
    image = sorted((catsdogs_dir / "test" / "cats").iterdir())[0]
    for backend in ("auto", "openvino-cpu"):
        r = cli("", "predict", bundle, image, "--precision", "bf16", "--backend", backend, code=NO_BF16_CPU, timeout=120)
        one_line_error(r, "this CPU has neither AVX-512 BF16 nor AMX, so OpenVINO cannot run bf16 here; use --precision fp32 or int8")
        assert len(r.stderr) < 200 and "tensorrt" not in r.stderr and r.returncode == 2, r.stderr
    from edgeconv_runtime.backends import openvino

    monkeypatch.setattr(openvino, "cpu_flags", lambda: {"fpu", "avx2", "avx512f"})
    assert openvino.bf16_status() == (False, openvino.NO_BF16)
    monkeypatch.setattr(openvino, "cpu_flags", lambda: {"avx512f", "amx_bf16", "amx_tile"})
    assert openvino.bf16_status()[0] == ("BF16" in openvino._core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
