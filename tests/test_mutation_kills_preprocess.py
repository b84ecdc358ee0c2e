"""The one decoder's promises that tests/test_decoder.py leaves to other suites (runtime/edgeconv_runtime/preprocess.py):
arrays of each accepted shape and the one-line refusal of others, the pixel cap's smallest value, JPEG draft decoding
at its exact threshold and for non-square sizes, transparency composited on white, the letterbox's grey bars and
centred image, and the recorded Preprocess normalised to tuples. Real images made here with Pillow; quick, so
`make mutants` runs these with test_decoder.py once per mutant."""
import io

import numpy as np
import pytest
from PIL import Image

from edgeconv_runtime import preprocess
from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.preprocess import (LETTERBOX_FILL, Preprocess, convert_mode, load_pixels, open_image, resize_image,
                                         set_max_pixels)


def jpeg(w: int, h: int) -> bytes:
    rng = np.random.default_rng(0)
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(b, "JPEG", quality=90)
    return b.getvalue()


def test_preprocess_record_is_normalised_to_tuples_of_numbers():
    p = Preprocess(size=[32.0, 48], channels=1, mean=[0], std=[2], value_range=[0, 255])
    assert p.size == (32, 48) and type(p.size) is tuple and all(type(s) is int for s in p.size)
    assert p.mean == (0.0,) and p.std == (2.0,) and p.value_range == (0, 255) and p.input_shape == (1, 32, 48)
    assert Preprocess.from_dict(p.to_dict()) == p


def test_the_pixel_cap_takes_one_and_refuses_zero():
    try:
        set_max_pixels(1)
        assert preprocess.MAX_PIXELS == 1
        with pytest.raises(EdgeconvError, match="--max-pixels must be >= 1, got 0"):
            set_max_pixels(0)
        assert preprocess.MAX_PIXELS == 1
    finally:
        set_max_pixels(None)
    assert preprocess.MAX_PIXELS == preprocess.DEFAULT_MAX_PIXELS


def test_arrays_of_each_accepted_shape_and_the_others_refused():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    img = open_image(gray)
    assert img.mode == "L" and img.size == (4, 3) and np.array_equal(np.asarray(img), gray)
    one = open_image(gray[:, :, None])
    assert one.mode == "L" and np.array_equal(np.asarray(one), gray)
    rgb = np.stack([gray, gray + 1, gray + 2], axis=2)
    got = open_image(rgb)
    assert got.mode == "RGB" and np.array_equal(np.asarray(got), rgb)
    rgba = np.concatenate([rgb, np.full((3, 4, 1), 255, np.uint8)], axis=2)
    assert open_image(rgba).mode == "RGBA"
    for bad in (np.zeros((3, 4, 2), np.uint8), np.zeros((3, 4, 5), np.uint8), np.zeros((2, 3, 4, 3), np.uint8), np.zeros(5, np.uint8)):
        with pytest.raises(EdgeconvError, match=r"image array has shape .*; pass HxW or HxWxC \(C = 1, 3 or 4\) uint8 pixels"):
            open_image(bad)
    with pytest.raises(EdgeconvError, match="image array has dtype float32"):
        open_image(gray.astype(np.float32))
    # and through the whole pipeline: a grayscale array to a grayscale model keeps its pixels
    px = load_pixels(gray, Preprocess(size=(3, 4), channels=1, mean=(0.0,), std=(1.0,)))
    assert px.shape == (3, 4, 1) and np.array_equal(px[:, :, 0], gray)


@pytest.mark.parametrize("size, draft, scaled", [((256, 256), (64, 64), (128, 128)), ((252, 252), (64, 64), (252, 252)),
                                                 ((252, 256), (64, 64), (252, 256)), ((256, 252), (64, 64), (256, 252)),
                                                 ((256, 512), (64, 128), (128, 256)), ((512, 256), (128, 64), (256, 128)),
                                                 ((512, 512), (64, 16), (128, 128)), ((512, 512), (16, 64), (128, 128))])
def test_jpeg_draft_starts_at_twice_the_margin_and_keeps_both_sides(size, draft, scaled):
    """Draft decoding starts when the JPEG is DRAFT_MARGIN * 2 times the size needed in both directions and keeps at
    least DRAFT_MARGIN times it: 256 px for 64 needed is decoded at 1/2 (128), 252 px in full; a 64 x 16 need on a
    512 px photo keeps 128 px (1/4), not the 1/8 the smaller side alone would allow."""
    assert preprocess.DRAFT_MARGIN == 2
    img = open_image(jpeg(*size), draft=draft)
    assert img.size == scaled


def test_transparency_is_composited_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (200, 10, 20, 255)  # opaque
    rgba[0, 1] = (200, 10, 20, 0)  # fully transparent: white
    rgba[1, 0] = (0, 0, 0, 128)  # half black: half white
    out = np.asarray(convert_mode(Image.fromarray(rgba, "RGBA"), 3))
    assert out[0, 0].tolist() == [200, 10, 20] and out[0, 1].tolist() == [255, 255, 255] and out[1, 1].tolist() == [255, 255, 255]
    assert 126 <= out[1, 0, 0] <= 128
    la = convert_mode(Image.fromarray(rgba[:, :, [0, 3]], "LA"), 3, strict=False)
    assert np.asarray(la)[0, 1].tolist() == [255, 255, 255]


def test_letterbox_centres_the_scaled_image_on_grey_bars():
    red = Image.new("RGB", (40, 20), (250, 0, 0))
    out = np.asarray(resize_image(red, Preprocess(size=(32, 32), resize="letterbox")))
    assert out.shape == (32, 32, 3)
    assert (out[:8] == LETTERBOX_FILL).all() and (out[24:] == LETTERBOX_FILL).all()  # 40 x 20 -> 32 x 16, rows 8..23
    assert (out[9:23] == (250, 0, 0)).all()
    tall = np.asarray(resize_image(Image.new("L", (10, 40), 7), Preprocess(size=(20, 20), channels=1, mean=(0.0,), std=(1.0,),
                                                                             resize="letterbox")))
    assert tall.shape == (20, 20) and (tall[:, :7] == LETTERBOX_FILL).all() and (tall[:, 8:12] == 7).all() and (tall[:, 13:] == LETTERBOX_FILL).all()
    same = Image.new("RGB", (16, 8), (1, 2, 3))
    assert np.asarray(resize_image(same, Preprocess(size=(8, 16), resize="letterbox"))).tolist() == np.asarray(same).tolist()


def test_bgr_arrays_are_flipped_to_rgb_and_nothing_else_is():
    from edgeconv_runtime.preprocess import bgr_to_rgb, preprocess_images

    bgr = np.zeros((2, 3, 3), np.uint8)
    bgr[..., 0] = 200  # blue in OpenCV's order
    assert bgr_to_rgb(bgr)[0, 0].tolist() == [0, 0, 200]
    bgra = np.dstack([bgr, np.full((2, 3), 9, np.uint8)])
    assert bgr_to_rgb(bgra)[0, 0].tolist() == [0, 0, 200, 9]
    gray = np.zeros((2, 3), np.uint8)
    assert bgr_to_rgb(gray) is gray and bgr_to_rgb(b"bytes") == b"bytes"
    one = np.zeros((2, 3, 1), np.uint8)
    assert bgr_to_rgb(one) is one
    pre = Preprocess(size=(2, 3))
    x = preprocess_images([bgr], pre, channel_order="BGR")
    assert x.shape == (1, 3, 2, 3) and np.allclose(x[0, 2], 200 / 255) and np.allclose(x[0, 0], 0)
    assert np.allclose(preprocess_images([bgr], pre)[0, 0], 200 / 255)  # RGB by default: taken as it is
    with pytest.raises(EdgeconvError, match="unknown channel_order 'rgba'"):
        preprocess_images([bgr], pre, channel_order="rgba")
    with pytest.raises(EdgeconvError, match="no images given"):
        preprocess_images([], pre)


# ------------------------------------------------------------------ survivors of `make mutants --limit 80`
def test_an_unknown_resize_policy_is_refused_when_the_record_is_made():
    with pytest.raises(EdgeconvError, match="unknown resize policy 'stretchy'; use one of"):
        Preprocess((28, 28), resize="stretchy")


def test_a_pil_image_is_decoded_as_it_is():
    img = Image.new("RGB", (40, 20), (10, 200, 30))
    px = load_pixels(img, Preprocess((8, 8), channels=3))
    assert px.shape == (8, 8, 3) and tuple(px[4, 4]) == (10, 200, 30)


def test_bytes_that_do_not_decode_are_named_by_their_length():
    with pytest.raises(EdgeconvError, match=r"<7 bytes>"):
        open_image(b"garbage")


def test_a_colour_image_given_to_a_one_channel_model_becomes_grayscale():
    img = Image.new("RGB", (16, 16), (255, 0, 0))
    px = load_pixels(img, Preprocess((8, 8), channels=1, mean=(0.0,), std=(1.0,)), strict=False)
    assert px.shape == (8, 8, 1) and px[0, 0, 0] == round(0.299 * 255)  # ITU-R 601-2 luma of pure red


@pytest.mark.parametrize("mean", [0.5, 1.0])
def test_normalize_subtracts_every_mean_that_is_not_zero(mean):
    pre = Preprocess((2, 2), channels=1, mean=(mean,), std=(1.0,))
    x = preprocess.normalize(np.full((2, 2, 1), 255, np.uint8), pre)
    np.testing.assert_allclose(x, np.full((1, 1, 2, 2), 1.0 - mean, np.float32))


def test_running_out_of_memory_while_decoding_is_a_one_line_too_large(monkeypatch):
    """Pillow's decoder raising MemoryError (an image under the pixel cap on a device short of memory) is ImageTooLarge."""
    from PIL import ImageFile

    data = jpeg(64, 64)

    def no_memory(self, *a, **k):
        raise MemoryError()

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_memory)
    with pytest.raises(preprocess.ImageTooLarge, match="too large to decode in the memory available"):
        open_image(data)
