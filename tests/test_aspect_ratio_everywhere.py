"""Issue 24 §1: the extreme-aspect-ratio PNG (545 bytes, 1 x 100,000 pixels: shorter_center_crop used to resize it to
224 x 22.4 M and the server was OOM-killed at 23.7 GB) is bounded in every place that decodes images, not only in
serve/v2 (tests/test_attack_round2.py): `edgeconv-runtime predict`, `Model.predict`, export's calibration loader and
training's decoder. Each runs in a child process under a 1 GB data limit: the crop bundle is the real small RGB model
imported with the ImageNet policy at 64 px, whose unbounded resize of one strip is 73 x 7.3 M x 3 = 1.6 GB, so a
runaway resize fails there (MemoryError or a kill) instead of on the machine."""
import resource
import subprocess
import sys
import textwrap

from PIL import Image

from test_attack_round2 import crop_bundle  # noqa: F401  (the module-scoped fixture)

DATA_LIMIT = 2**30


def _limited(cmd, timeout=300):
    def limit():
        resource.setrlimit(resource.RLIMIT_DATA, (DATA_LIMIT, resource.getrlimit(resource.RLIMIT_DATA)[1]))

    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=limit)


def _strips(tmp_path):
    d = tmp_path / "strips"
    d.mkdir()
    Image.new("RGB", (100_000, 1), (200, 30, 10)).save(d / "wide.png")
    Image.new("RGB", (1, 100_000), (10, 30, 200)).save(d / "tall.png")
    assert all(p.stat().st_size < 2_000 for p in d.iterdir())
    return d


def test_predict_cli_answers_a_1x100000_png_in_bounded_memory(crop_bundle, tmp_path):
    d = _strips(tmp_path)
    r = _limited([sys.executable, "-m", "edgeconv_runtime", "predict", str(crop_bundle), str(d / "wide.png"), str(d / "tall.png")])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "wide.png" in r.stdout and "tall.png" in r.stdout, r.stdout


def test_model_predict_calibration_and_training_loaders_bound_the_resize(crop_bundle, tmp_path):
    d = _strips(tmp_path)
    script = textwrap.dedent(f"""
        from pathlib import Path
        from edgeconv_runtime import Model
        from edgeconv_export.images import load_images
        from edgeconv.data import _decode_files
        model = Model.load({str(crop_bundle)!r})
        files = sorted(Path({str(d)!r}).glob("*.png"))
        preds = model.predict(files)
        assert len(preds) == 2, preds
        x, kept = load_images(files, model.preprocess, "--calib-data")
        assert x.shape == (2, 3, *model.preprocess.size) and len(kept) == 2, (x.shape, kept)
        pixels, readable = _decode_files(files, model.preprocess, 2)
        assert pixels.shape == (2, *model.preprocess.size, 3), pixels.shape
        print("ok", x.shape, pixels.shape)
    """)
    r = _limited([sys.executable, "-c", script])
    assert r.returncode == 0 and r.stdout.startswith("ok"), (r.stdout[-500:], r.stderr[-2000:])
