"""The one safe image decoder (issue 13): formats, pixel cap from the header, JPEG draft, EXIF, fuzz."""
from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from edgeconv_runtime.errors import EdgeconvError, ImageTooLarge, UnsupportedImage
from edgeconv_runtime.preprocess import Preprocess, load_pixels, open_image, preprocess_images

ROOT = Path(__file__).resolve().parents[1]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def forged_png(w: int, h: int) -> bytes:
    """A ~70-byte PNG whose IHDR (correct CRC) declares a w x h RGB canvas."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + _chunk(b"IEND", b"")


def forged_gif(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "GIF")
    b = bytearray(buf.getvalue())
    b[6:10] = struct.pack("<HH", w, h)  # logical screen size
    return bytes(b)


def forged_webp(w: int, h: int) -> bytes:
    """A small lossless WebP whose VP8L header declares w x h (14 bits each)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, "WEBP", lossless=True)
    b = bytearray(buf.getvalue())
    assert b[12:16] == b"VP8L" and b[20] == 0x2F
    bits = struct.unpack("<I", bytes(b[21:25]))[0]
    bits = (bits & ~((1 << 28) - 1)) | (w - 1) | ((h - 1) << 14)
    b[21:25] = struct.pack("<I", bits)
    return bytes(b)


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def cat_path(catsdogs_dir) -> Path:
    return catsdogs_dir / "train" / "cats" / "cat.1.jpg"


# ------------------------------------------------------------------ pixel cap and formats


@pytest.mark.parametrize("make,size", [(forged_png, (60000, 60000)), (forged_png, (10000, 10000)), (forged_png, (7000, 7000)),
                                       (forged_webp, (16384, 16384)), (forged_webp, (7000, 7000))])
def test_forged_header_is_refused_as_too_large(make, size):
    data = make(*size)
    assert len(data) < 200
    with pytest.raises(ImageTooLarge) as e:
        open_image(data)
    msg = str(e.value)
    assert "\n" not in msg and "--max-pixels" in msg and "40000000" in msg
    assert f"{size[0]}x{size[1]}" in msg or f"{size[0] * size[1]} pixels" in msg


def test_cap_is_an_argument_and_a_process_setting(cat_path):
    from edgeconv_runtime import preprocess

    with pytest.raises(ImageTooLarge, match=r"500x374|374x500|over the cap of 1000 pixels"):
        open_image(cat_path, max_pixels=1000)
    try:
        preprocess.set_max_pixels(1000)
        with pytest.raises(ImageTooLarge, match=str(cat_path.name)):
            load_pixels(cat_path, Preprocess((64, 64)))
    finally:
        preprocess.set_max_pixels(None)
    assert load_pixels(cat_path, Preprocess((64, 64))).shape == (64, 64, 3)


def test_forged_headers_allocate_nothing_big():
    """In a fresh process (peak RSS is per process): each forged image is refused with < 30 MB of peak growth."""
    code = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from test_decoder import forged_gif, forged_png, forged_webp
from edgeconv_runtime.preprocess import open_image
from edgeconv_runtime.errors import EdgeconvError
open_image(forged_png(8, 8)) if False else None
out = []
for name, data in [("gif", forged_gif(65535, 65535)), ("png", forged_png(7000, 7000)), ("png-bomb", forged_png(60000, 60000)),
                   ("webp", forged_webp(16384, 16384)), ("webp-small", forged_webp(7000, 7000))]:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    try:
        open_image(data)
        err = None
    except EdgeconvError as exc:
        err = type(exc).__name__
    out.append({"name": name, "bytes": len(data), "error": err, "ms": (time.perf_counter() - t0) * 1e3,
                "peak_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024})
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    for row in rows:
        assert row["error"] in ("ImageTooLarge", "UnsupportedImage"), row
        assert row["peak_growth_mb"] < 30, row


@pytest.mark.parametrize("fmt,name", [("GIF", "GIF"), ("TIFF", "TIFF"), ("PPM", "PPM")])
def test_other_formats_are_refused_by_name(fmt, name):
    data = _encoded(Image.new("RGB", (16, 16), (1, 2, 3)), fmt)
    with pytest.raises(UnsupportedImage) as e:
        load_pixels(data, Preprocess((16, 16)))
    assert name in str(e.value) and "JPEG, PNG, WebP, BMP" in str(e.value)


def test_postscript_never_reaches_ghostscript(tmp_path):
    eps = tmp_path / "x.eps.jpg"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(UnsupportedImage, match=r"x\.eps\.jpg is a PostScript"):
        open_image(eps)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP"])
def test_accepted_formats_decode(fmt, cat_path):
    img = Image.open(cat_path).convert("RGB").resize((40, 30))
    px = load_pixels(_encoded(img, fmt), Preprocess((30, 40)))
    assert px.shape == (30, 40, 3) and px.dtype == np.uint8


def test_truncated_and_unconvertible_images_are_one_line_errors(cat_path, tmp_path):
    data = cat_path.read_bytes()
    with pytest.raises(EdgeconvError, match="cannot decode image"):
        load_pixels(data[: len(data) // 2], Preprocess((64, 64)))
    bad = tmp_path / "bad.png"
    bad.write_bytes(forged_png(8, 8)[:40])
    with pytest.raises(EdgeconvError) as e:
        load_pixels(bad, Preprocess((8, 8)))
    assert "bad.png" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------ EXIF orientation


def test_exif_orientation_is_applied_in_training_and_runtime(cat_path, tmp_path):
    from edgeconv.data import _decode_files

    upright = Image.open(cat_path).convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a phone stores; orientation 6 says "rotate 270 to show"
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged, plain = tmp_path / "tagged.jpg", tmp_path / "plain.jpg"
    stored.save(tagged, quality=95, exif=exif)
    stored.save(plain, quality=95)
    shown = np.asarray(open_image(plain).transpose(Image.Transpose.ROTATE_270))
    assert np.array_equal(np.asarray(open_image(tagged)), shown)
    assert open_image(tagged).size == upright.size
    pre = Preprocess((64, 96), resize="stretch")
    expected = load_pixels(_encoded(Image.fromarray(shown), "PNG"), pre)
    assert np.array_equal(load_pixels(tagged, pre), expected)
    pixels, keep = _decode_files([tagged], pre, 1)  # training's decoder
    assert keep == [0] and np.array_equal(pixels[0], expected)


def test_exif_rotated_photo_is_classified_like_the_upright_one(rgb_bundle, cat_path, tmp_path):
    from edgeconv_runtime import Model

    stored = Image.open(cat_path).convert("RGB").transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged = tmp_path / "tagged.jpg"
    stored.save(tagged, quality=95, exif=exif)
    upright = tmp_path / "upright.png"
    open_image(_encoded(stored, "JPEG", quality=95)).transpose(Image.Transpose.ROTATE_270).save(upright)
    sideways = tmp_path / "sideways.png"
    open_image(_encoded(stored, "JPEG", quality=95)).save(sideways)
    with Model.load(str(rgb_bundle)) as m:
        a, b, c = m.predict([str(tagged), str(upright), str(sideways)], top_k=2)
    assert a.labels == b.labels and np.allclose(a.probabilities, b.probabilities, atol=1e-6)
    assert not np.allclose(a.probabilities, c.probabilities, atol=1e-6)  # the test can tell orientation apart


# ------------------------------------------------------------------ JPEG draft


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory, cat_path) -> Path:
    p = tmp_path_factory.mktemp("big") / "big.jpg"
    Image.open(cat_path).convert("RGB").resize((2000, 2000), Image.Resampling.BICUBIC).save(p, quality=90)
    return p


@pytest.mark.parametrize("pre", [Preprocess((150, 150), jpeg_draft=True), Preprocess((224, 224), resize="shorter_center_crop", jpeg_draft=True)])
def test_draft_decodes_large_jpegs_reduced_and_training_matches(big_jpeg, pre):
    """The decoder asks libjpeg for a reduced image (DCT scaling: a quarter of the pixels or fewer here, measured 2.4x to
    6x faster on a quiet machine; no wall-clock assertion, which a busy machine turns red) and resizes that: training's
    decoder and the runtime's give the same pixels."""
    from edgeconv.data import _decode_files
    from edgeconv_runtime.preprocess import draft_size, resize_image

    need = draft_size(pre)
    drafted = open_image(big_jpeg, draft=need)
    assert 2 * need[0] <= drafted.size[0] < 2000 and 2 * need[1] <= drafted.size[1] < 2000  # reduced, with margin
    assert 4 * drafted.size[0] * drafted.size[1] <= 2000 * 2000
    assert open_image(big_jpeg).size == (2000, 2000)
    runtime = load_pixels(big_jpeg, pre)
    assert np.array_equal(runtime, np.asarray(resize_image(drafted.convert("RGB"), pre)))  # decoded from the reduced image
    pixels, keep = _decode_files([big_jpeg], pre, 1)
    assert keep == [0] and np.array_equal(pixels[0], runtime)
    batch = preprocess_images([str(big_jpeg)], pre)
    from edgeconv_runtime.preprocess import normalize

    assert np.array_equal(batch, normalize(runtime, pre))


def test_normal_size_jpeg_is_decoded_at_full_scale(cat_path):
    """Below 4x the model input nothing changes: bit-identical to a plain full decode."""
    from edgeconv_runtime.preprocess import resize_image

    pre = Preprocess((150, 150))
    with Image.open(cat_path) as im:
        full = np.asarray(resize_image(im.convert("RGB"), pre))
    assert np.array_equal(load_pixels(cat_path, pre), full)


# ------------------------------------------------------------------ fuzz


def _seeds() -> list:
    """Small real encodings of every accepted format, with EXIF, text chunks, palettes, 16-bit, alpha and CMYK."""
    from PIL import PngImagePlugin

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Camera"
    text = PngImagePlugin.PngInfo()
    text.add_text("comment", "v" * 50)
    return [_encoded(img, "JPEG", quality=80, exif=exif), _encoded(img, "PNG", pnginfo=text, exif=exif),
            _encoded(img, "WEBP", exif=exif), _encoded(img.convert("P"), "BMP"), _encoded(img, "BMP"),
            _encoded(Image.fromarray(np.arange(24 * 32, dtype=np.uint16).reshape(24, 32)), "PNG"),
            _encoded(img.convert("RGBA"), "WEBP", lossless=True), _encoded(img.convert("CMYK"), "JPEG"),
            _encoded(img.convert("L"), "PNG")]


SEEDS = _seeds()


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.integers(0, 2))
        i = draw(st.integers(0, len(data) - 1))
        if op == 0:
            data[i] = draw(st.integers(0, 255))
        elif op == 1:
            del data[i:i + draw(st.integers(1, 64))]
        else:
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        if not data:
            data = bytearray(b"\x00")
    return bytes(data)


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.one_of(st.binary(min_size=0, max_size=256), mutated()))
def test_fuzz_decoder_raises_only_edgeconv_errors(data):
    pre = Preprocess((16, 16), channels=3)
    try:
        px = load_pixels(data, pre, strict=False, max_pixels=2_000_000)
    except EdgeconvError as exc:
        assert "\n" not in str(exc)
    else:
        assert px.shape == (16, 16, 3)


def _mutate(rng, data: bytes) -> bytes:
    d = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        j, op = rng.randrange(len(d)), rng.randrange(3)
        if op == 0:
            d[j] = rng.randrange(256)
        elif op == 1:
            del d[j:j + rng.randint(1, 64)]
        else:
            d[j:j] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        if not d:
            d = bytearray(b"\x00")
    return bytes(d)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt EXIF it skips
def test_seeded_mutation_sweep_raises_only_edgeconv_errors():
    """A fixed sweep of 4000 mutations: reaches the rarer Pillow failures (ValueError, SyntaxError) every run."""
    import random

    rng = random.Random(1)
    pre = Preprocess((16, 16))
    for _ in range(4000):
        data = _mutate(rng, rng.choice(SEEDS))
        try:
            load_pixels(data, pre, strict=False, max_pixels=2_000_000)
        except EdgeconvError as exc:
            assert "\n" not in str(exc)


# ------------------------------------------------------------------ CLI


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edgeconv_runtime", *args], capture_output=True, text=True, timeout=300)


def test_cli_names_a_single_bad_input_and_skips_in_folders(rgb_bundle, catsdogs_tiny, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(forged_png(7000, 7000))
    r = _cli("predict", str(rgb_bundle), str(bomb))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "bomb.png" in r.stderr and "--max-pixels" in r.stderr
    cat = sorted((catsdogs_tiny / "test" / "cats").iterdir())[0]
    r = _cli("predict", str(rgb_bundle), str(cat), "--max-pixels", "1000")
    assert r.returncode != 0 and "over the cap of 1000 pixels" in r.stderr and "Traceback" not in r.stderr
    # evaluate: bad files in the folder are skipped and counted
    folder = tmp_path / "eval"
    for cls in ("cats", "dogs"):
        (folder / cls).mkdir(parents=True)
        for f in sorted((catsdogs_tiny / "test" / cls).iterdir())[:3]:
            (folder / cls / f.name).write_bytes(f.read_bytes())
    (folder / "cats" / "bomb.png").write_bytes(forged_png(7000, 7000))
    (folder / "dogs" / "anim.gif").write_bytes(forged_gif(16, 16))
    r = _cli("evaluate", str(rgb_bundle), str(folder), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["n"] == 6 and out["skipped"] == 2


def test_models_recorded_without_draft_keep_decoding_in_full(big_jpeg, mnist_run):
    """A checkpoint or bundle from before draft decoding has no jpeg_draft: it decodes as it was trained."""
    from edgeconv_runtime.preprocess import resize_image

    old = Preprocess.from_dict({"size": [150, 150], "channels": 3})  # an older manifest's record
    assert old.jpeg_draft is False
    full = np.asarray(resize_image(open_image(big_jpeg).convert("RGB"), old))
    assert np.array_equal(load_pixels(big_jpeg, old), full)
    assert not np.array_equal(load_pixels(big_jpeg, Preprocess((150, 150), jpeg_draft=True)), full)
    import torch

    ck = torch.load(mnist_run / "model.pt", weights_only=True)
    assert ck["preprocess"]["jpeg_draft"] is True  # new runs record it, so their bundles decode the same way


# ------------------------------------------------------------------ extreme aspect ratios (issue 24)
_ASPECT_SCRIPT = r"""
import io, resource, sys
import numpy as np
from PIL import Image
from edgeconv_runtime.preprocess import Preprocess, load_pixels

pngs = []
for size in ((1, 100_000), (100_000, 1)):  # 1 x 100,000 pixels: a ~545-byte PNG
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 10)).save(buf, "PNG")
    pngs.append(buf.getvalue())
soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
resource.setrlimit(resource.RLIMIT_DATA, (1536 * 2**20, hard))  # resizing the short side to 224 would need 15 GB
pre = Preprocess((224, 224), resize="shorter_center_crop", crop_pct=1.0)
for png in pngs:
    px = load_pixels(png, pre)
    assert px.shape == (224, 224, 3) and (px == (200, 30, 10)).all(), (px.shape, px[0, 0])
peak = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]  # kB; ru_maxrss would count the parent's
print("ok", len(pngs[0]), int(peak) // 1024)
"""


def test_extreme_aspect_ratio_is_cropped_before_it_is_resized():
    """A 1 x 100,000 PNG of a few hundred bytes, given to a shorter_center_crop model: resizing its short side to 224
    first would make a 224 x 22.4 M image (15 GB); the crop is taken before the resize, so memory stays bounded. Run in
    a child process under a 1.5 GB data limit, so the old behaviour fails there instead of exhausting the machine."""
    r = subprocess.run([sys.executable, "-c", _ASPECT_SCRIPT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    _, png_bytes, peak_mb = r.stdout.split()
    assert int(png_bytes) < 1000 and int(peak_mb) < 400, r.stdout


def _crop_as_before(img: Image.Image, pre: Preprocess) -> np.ndarray:
    """The shorter_center_crop of release 1: resize the whole image, then crop its centre (the pixels models were trained on)."""
    h, w = pre.size
    short = int(round(min(h, w) / pre.crop_pct))
    iw, ih = img.size
    nw, nh = (short, max(short, int(round(ih * short / iw)))) if iw <= ih else (max(short, int(round(iw * short / ih))), short)
    if (nw, nh) != (iw, ih):
        img = img.resize((nw, nh), Image.Resampling.BILINEAR if pre.interpolation == "bilinear" else Image.Resampling.BICUBIC)
    left, top = (nw - w) // 2, (nh - h) // 2
    return np.asarray(img.crop((left, top, left + w, top + h)))


@pytest.mark.parametrize("size,crop_pct,interp", [((224, 224), 0.875, "bilinear"), ((64, 64), 1.0, "bicubic"), ((128, 96), 0.95, "bilinear")])
def test_normal_images_crop_to_the_same_pixels_as_before(catsdogs_dir, size, crop_pct, interp):
    """Photos of ordinary shapes keep exactly the pixels of resize-then-crop: bundles answer as they were trained."""
    pre = Preprocess(size, resize="shorter_center_crop", crop_pct=crop_pct, interpolation=interp)
    files = sorted((catsdogs_dir / "test" / "cats").iterdir())[:12] + sorted((catsdogs_dir / "test" / "dogs").iterdir())[:12]
    for f in files:
        with Image.open(f) as im:
            assert np.array_equal(load_pixels(f, pre), _crop_as_before(im.convert("RGB"), pre)), f


@pytest.mark.parametrize("size,crop_pct", [((224, 224), 0.875), ((128, 96), 0.95), ((96, 128), 1.0)])
def test_a_resize_beyond_the_pixel_cap_gives_the_same_crop(cat_path, tmp_path, size, crop_pct):
    """Where the resized image would pass the pixel cap (here: a small photo enlarged, with the cap at its own size), only
    the rows or columns the crop keeps are resized: the same picture within one grey level of resize-then-crop."""
    pre = Preprocess(size, resize="shorter_center_crop", crop_pct=crop_pct)
    for shape in ((90, 70), (70, 90)):
        small = tmp_path / f"small{shape[0]}.png"
        Image.open(cat_path).convert("RGB").resize(shape, Image.Resampling.BICUBIC).save(small)
        want = _crop_as_before(Image.open(small).convert("RGB"), pre).astype(int)
        got = load_pixels(small, pre, max_pixels=shape[0] * shape[1]).astype(int)
        assert got.shape == want.shape and np.abs(got - want).max() <= 1 and (got != want).mean() < 0.05, shape
