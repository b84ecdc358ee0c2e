"""Streams: a real video written with OpenCV from real cats_and_dogs_small test photos, classified frame by frame."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from edgeconv_runtime import EdgeconvError, Model
from edgeconv_runtime.cli import main as runtime_main

cv2 = pytest.importorskip("cv2", reason="streams need OpenCV: pip install opencv-python-headless (in the dev extra)")

N_IMAGES = 40  # 20 cats + 20 dogs from the real test split
HOLD = 3  # frames per photo
FPS = 10.0
FRAME = (128, 128)  # (width, height) of the video


def write_video(path, frames_rgb, hold, fps=FPS):
    """An MJPG .avi (quality 95) of RGB frames, each held for ``hold`` frames; OpenCV's writer takes BGR."""
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, FRAME)
    assert w.isOpened(), "OpenCV cannot write MJPG here"
    w.set(cv2.VIDEOWRITER_PROP_QUALITY, 95)
    for rgb in frames_rgb:
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        for _ in range(hold):
            w.write(bgr)
    w.release()
    return path


@pytest.fixture(scope="module")
def photos(catsdogs_dir):
    """40 real test JPEGs resized to the video's frame size: the pictures the video shows, in RGB."""
    files = [f for cls in ("cats", "dogs") for f in sorted((catsdogs_dir / "test" / cls).iterdir())[: N_IMAGES // 2]]
    order = np.random.default_rng(0).permutation(len(files))  # cats and dogs interleaved
    return [np.asarray(Image.open(files[i]).convert("RGB").resize(FRAME, Image.Resampling.BILINEAR)) for i in order]


@pytest.fixture(scope="module")
def video(tmp_path_factory, photos):
    return write_video(tmp_path_factory.mktemp("video") / "catsdogs.avi", photos, HOLD)


@pytest.fixture(scope="module")
def model(rgb_bundle):
    return Model.load(rgb_bundle)


@pytest.fixture(scope="module")
def per_image(model, photos):
    """Top-1 of each photo, predicted as an image (RGB array), not from the video."""
    return [p.indices[0] for p in model.predict(photos, top_k=1)]


def test_frames_agree_with_per_image_predictions(model, video, per_image):
    with model.stream(video, top_k=2) as stream:
        preds = list(stream)
        s = stream.summary()
    assert [p.frame for p in preds] == list(range(N_IMAGES * HOLD))
    agreement = float(np.mean([p.indices[0] == per_image[p.frame // HOLD] for p in preds]))
    # MJPG at quality 95 is lossy: a photo near the decision boundary may flip; nearly all must not
    assert agreement >= 0.9, agreement
    ts = np.array([p.timestamp_ms for p in preds])
    assert np.allclose(ts, np.arange(len(preds)) * 1000.0 / FPS, atol=1.0)  # the container's clock, not the wall's
    assert s["frames"] == s["frames_read"] == N_IMAGES * HOLD and s["fps"] > 0 and s["clock"] == "source"
    assert 0 < s["latency_ms"]["p50"] <= s["latency_ms"]["p99"] <= s["latency_ms"]["max"] and not s["interrupted"]
    assert all(len(p.labels) == 2 and p.latency_ms > 0 for p in preds)
    print(f"\nstream of {N_IMAGES} real photos x {HOLD} frames (MJPG q95): top-1 agreement with per-image predictions {agreement:.3f}; "
          f"{s['frames']} frames in {s['seconds']:.3f} s, {s['fps']:.0f} frames/s, latency ms p50 {s['latency_ms']['p50']:.2f} "
          f"p90 {s['latency_ms']['p90']:.2f} p99 {s['latency_ms']['p99']:.2f} ({s['backend']} {s['precision']}, batch 1)")


def test_every_max_frames_and_batch(model, video):
    with model.stream(video, every=4, max_frames=7) as stream:
        preds = list(stream)
    assert [p.frame for p in preds] == [0, 4, 8, 12, 16, 20, 24]
    assert stream.summary()["frames_read"] == 25
    with model.stream(video, batch=4, max_frames=10) as stream:
        batched = list(stream)
    with model.stream(video, max_frames=10) as stream:
        single = list(stream)
    assert [p.frame for p in batched] == list(range(10))
    assert [p.indices for p in batched] == [p.indices for p in single]
    assert np.allclose([p.probabilities for p in batched], [p.probabilities for p in single], atol=1e-5)
    assert len(stream.infer_ms) == 10  # one inference per frame at batch 1; batch 4 ran 3
    with pytest.raises(EdgeconvError, match="every must be"):
        model.stream(video, every=0)


def test_bgr_arrays_with_channel_order(model, photos):
    rgb = photos[0]
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    want = model.predict(rgb, top_k=2)
    got = model.predict(bgr, top_k=2, channel_order="bgr")
    assert got.labels == want.labels and got.probabilities == want.probabilities
    assert np.array_equal(model.preprocess_images([bgr], channel_order="BGR"), model.preprocess_images([rgb]))
    assert model.predict(bgr, top_k=2).probabilities != want.probabilities  # the order matters: BGR read as RGB differs
    bgra = np.concatenate([bgr, np.full(bgr.shape[:2] + (1,), 255, np.uint8)], axis=2)
    assert model.predict(bgra, top_k=2, channel_order="bgr").probabilities == want.probabilities
    with pytest.raises(EdgeconvError, match="channel_order"):
        model.predict(rgb, channel_order="gbr")


def runtime_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "edgeconv_runtime", *args], capture_output=True, text=True, timeout=300, **kw)


def test_cli_json_lines_and_summary(rgb_bundle, video, capsys):
    with pytest.raises(SystemExit) as e:
        runtime_main(["predict", str(rgb_bundle), "--source", str(video), "--json", "--every", "3", "--max-frames", "10", "--top-k", "1"])
    assert e.value.code == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    frames, summary = lines[:-1], lines[-1]["summary"]
    assert [f["frame"] for f in frames] == list(range(0, 30, 3))
    assert all(set(f) == {"frame", "timestamp_ms", "latency_ms", "top"} and len(f["top"]) == 1 for f in frames)
    assert frames[1]["timestamp_ms"] == pytest.approx(300.0, abs=1.0)
    assert summary["frames"] == 10 and summary["every"] == 3 and summary["fps"] > 0 and summary["latency_ms"]["p99"] > 0
    with pytest.raises(SystemExit) as e:
        runtime_main(["predict", str(rgb_bundle), "--source", str(video), "--max-frames", "5", "--batch", "2"])
    out = capsys.readouterr().out.splitlines()
    assert e.value.code == 0 and out[0].split() == ["frame", "time", "ms", "latency", "ms", "top-k"] and len(out) == 7
    assert out[-1].startswith("5 frames classified (5 read) in ") and "frames/s; latency ms p50" in out[-1] and "batch 2" in out[-1]


def test_predict_needs_images_or_source(rgb_bundle, video, capsys):
    for args, needle in ((["predict", str(rgb_bundle)], "predict needs image files or --source"),
                         (["predict", str(rgb_bundle), "x.jpg", "--source", str(video)], "not both"),
                         (["predict", str(rgb_bundle), "x.jpg", "--every", "2"], "apply to --source only")):
        with pytest.raises(SystemExit) as e:
            runtime_main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and needle in err, err


def test_unreadable_sources_are_one_line_errors(rgb_bundle, tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(os.urandom(64 * 1024))
    empty_dir = tmp_path / "frames"
    empty_dir.mkdir()
    cases = [(tmp_path / "missing.mp4", "video not found"), (garbage, "cannot open video source"),
             ("rtsp://127.0.0.1:9/none", "cannot open video source rtsp://127.0.0.1:9/none"), (empty_dir, "is a folder"),
             ("/dev/video97", "camera not found")]
    for src, needle in cases:
        t0 = time.perf_counter()
        r = runtime_cli("predict", str(rgb_bundle), "--source", str(src))
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and needle in r.stderr, (src, r.stderr)
        assert r.stdout == "" and time.perf_counter() - t0 < 60
    # without OpenCV: the install hint, before the model is loaded
    code = "import sys; sys.modules['cv2'] = None; from edgeconv_runtime.cli import main; main(sys.argv[1:])"
    r = subprocess.run([sys.executable, "-c", code, "predict", str(rgb_bundle), "--source", str(garbage)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr == "error: video sources need OpenCV, which is not installed: pip install 'edgeconv-runtime[video]'\n"


def test_sigint_ends_cleanly_with_summary_even_when_inherited_ignored(rgb_bundle, photos, tmp_path):
    """Started the way `cmd &` starts it from a script (SIGINT ignored), Ctrl-C still ends it: summary, exit 130."""
    long_video = write_video(tmp_path / "long.avi", photos * 25, 3)  # 3000 frames: seconds of work, stopped after the first
    proc = subprocess.Popen([sys.executable, "-m", "edgeconv_runtime", "predict", str(rgb_bundle), "--source", str(long_video), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,  # unbuffered: readline() reads no
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # further line that communicate() would miss
    try:
        first = json.loads(proc.stdout.readline())
        assert first["frame"] == 0
        proc.send_signal(signal.SIGINT)
        out, err = (b.decode() for b in proc.communicate(timeout=60))
    finally:
        proc.kill()
        proc.wait()
    lines = out.splitlines()
    summary = json.loads(lines[-1])["summary"]
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert summary["interrupted"] and 1 <= summary["frames"] < 3000 and summary["frames"] == len(lines)  # frame lines + first
