"""Image preprocessing shared by training and the runtime.

Training decodes and resizes its images with these same functions, so the bundle's
preprocessing is the training pipeline's evaluation transform by construction, not by
re-typing mean/std on the device.
"""
from __future__ import annotations

import difflib
import io
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import EdgeconvError, ImageTooLarge, UnsupportedImage

RESIZE_POLICIES = ("stretch", "shorter_center_crop", "letterbox")
LETTERBOX_FILL = 114  # grey bars around a letterboxed image (the YOLO / Ultralytics value)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]
IMAGE_SOURCE_TYPES = (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)
CHANNEL_ORDERS = ("rgb", "bgr")


@dataclass(frozen=True)
class Preprocess:
    """How raw pixels become the model's input tensor (recorded in checkpoints and bundles).

    ``stretch`` resizes straight to ``size`` (Keras' ``flow_from_directory``, the book's
    policy); ``shorter_center_crop`` resizes the shorter side to ``size / crop_pct`` and
    crops the centre (the ImageNet evaluation policy); ``letterbox`` fits the whole image
    inside ``size`` keeping its aspect ratio and pads the rest with grey (LETTERBOX_FILL). Pixels are scaled by ``scale`` then
    normalised with ``mean``/``std`` per channel; layout NCHW, channel order RGB or L.
    """

    size: tuple  # (height, width)
    channels: int = 3
    resize: str = "stretch"
    crop_pct: float = 0.875
    scale: float = 1.0 / 255.0
    mean: tuple = (0.0, 0.0, 0.0)
    std: tuple = (1.0, 1.0, 1.0)
    interpolation: str = "bilinear"
    layout: str = "NCHW"
    value_range: tuple = (0, 255)
    # JPEGs much larger than the input decode at 1/2, 1/4 or 1/8 scale (draft mode): faster and far less memory for
    # photos, but other pixels than a full decode. Recorded with the model so training and every device decode alike:
    # runs and bundles made before it existed read False and keep decoding in full, as they were trained.
    jpeg_draft: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "value_range", tuple(self.value_range))
        if self.channels not in (1, 3):
            raise EdgeconvError(f"preprocessing channels must be 1 or 3, got {self.channels}")
        if self.resize not in RESIZE_POLICIES:
            raise EdgeconvError(f"unknown resize policy {self.resize!r}; use one of {', '.join(RESIZE_POLICIES)}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise EdgeconvError(f"mean/std need {self.channels} values each, got {self.mean} / {self.std}")

    @property
    def channel_order(self) -> str:
        return "RGB" if self.channels == 3 else "L"

    @property
    def input_shape(self) -> tuple:
        return (self.channels, *self.size)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        d["value_range"] = list(self.value_range)
        d["channel_order"] = self.channel_order
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


INTERPOLATIONS = ("bilinear", "bicubic")
JPEG_DRAFT = True  # what every new model records (training, `edgeconv import` by name or from ONNX): big JPEGs decode in draft mode
DEFAULT_SIZE = (150, 150)  # a model without a size, on data without one (the book's Keras models)


@dataclass(frozen=True)
class PreprocessPolicy(Mapping):
    """A partial :class:`Preprocess`: what a model (its registry entry, its hub's weights) or the user fixes; None is "not said".

    :func:`resolve_preprocess` fills the rest from the data and one set of defaults. Reads like a dict of the keys it
    sets (``policy["mean"]``, ``policy.get("crop_pct", 0.875)``); a key no Preprocess has is refused in one line.
    """

    size: Optional[tuple] = None
    channels: Optional[int] = None
    resize: Optional[str] = None
    crop_pct: Optional[float] = None
    scale: Optional[float] = None
    mean: Optional[tuple] = None
    std: Optional[tuple] = None
    interpolation: Optional[str] = None
    jpeg_draft: Optional[bool] = None

    def __post_init__(self) -> None:
        for key in ("size", "mean", "std"):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, tuple(getattr(self, key)))
        if self.resize is not None and self.resize not in RESIZE_POLICIES:
            raise EdgeconvError(f"unknown resize policy {self.resize!r}; use one of {', '.join(RESIZE_POLICIES)}")
        if self.interpolation is not None and self.interpolation not in INTERPOLATIONS:
            raise EdgeconvError(f"unknown interpolation {self.interpolation!r}; use one of {', '.join(INTERPOLATIONS)}")

    @classmethod
    def of(cls, value=None, what: str = "preprocess") -> "PreprocessPolicy":
        """``value`` (a dict, a policy or None) as a policy; None values are "not said", a misspelt key is an error."""
        if isinstance(value, cls):
            return value
        value = dict(value or {})
        unknown = [k for k in value if k not in cls.__dataclass_fields__]
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), list(cls.__dataclass_fields__), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise EdgeconvError(f"unknown {what} key {unknown[0]!r}; {hint}the keys are {', '.join(cls.__dataclass_fields__)}")
        return cls(**{k: v for k, v in value.items() if v is not None})

    def updated(self, other) -> "PreprocessPolicy":
        """This policy with what ``other`` (a dict or policy) says on top."""
        return replace(self, **dict(PreprocessPolicy.of(other)))

    def __getitem__(self, key):
        value = getattr(self, key, None) if key in self.__dataclass_fields__ else None
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self):
        return (k for k in self.__dataclass_fields__ if getattr(self, k) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def resolve_preprocess(entry, data=None, overrides=None) -> Preprocess:
    """The one place a model's :class:`Preprocess` is made (timm's ``resolve_data_config`` is the model).

    ``entry`` is what the model says: a registry entry (its ``preprocess`` policy and ``default_size``) or a
    :class:`PreprocessPolicy` / dict. ``data`` is what the images are (``channels``, ``native_size``; None: nothing known).
    ``overrides`` is what the user passed (a dict or policy; None values are not passed; a misspelt key is an error).
    Order: the user, then the model, then the data, then the defaults: size (H, W) the model's, else the data's, else
    150x150 (a model without a size takes the data's own); channels the model's, else the data's, else 3; mean 0 and
    std 1 per channel; stretch, crop_pct 0.875, scale 1/255, bilinear; jpeg_draft :data:`JPEG_DRAFT`.
    """
    policy = PreprocessPolicy.of(getattr(entry, "preprocess", entry))
    model_size = getattr(entry, "default_size", None) or policy.size
    asked = PreprocessPolicy.of(overrides, "preprocess override")
    policy = policy.updated(asked)
    size = asked.size or model_size or getattr(data, "native_size", None) or DEFAULT_SIZE
    channels = policy.channels or getattr(data, "channels", None) or 3
    return Preprocess(size=size, channels=channels, resize=policy.get("resize", "stretch"), crop_pct=policy.get("crop_pct", 0.875),
                      scale=policy.get("scale", 1.0 / 255.0), mean=policy.get("mean", (0.0,) * channels),
                      std=policy.get("std", (1.0,) * channels), interpolation=policy.get("interpolation", "bilinear"),
                      jpeg_draft=policy.get("jpeg_draft", JPEG_DRAFT))


ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")  # Pillow's names; nothing else is even parsed
_ACCEPTED_TEXT = "JPEG, PNG, WebP, BMP"
DEFAULT_MAX_PIXELS = 40_000_000  # 40 megapixels: any phone photo, ~120 MB decoded as RGB
MAX_PIXELS = DEFAULT_MAX_PIXELS  # the process-wide cap (``--max-pixels`` sets it); open_image(max_pixels=) overrides
DRAFT_MARGIN = 2  # JPEG draft decoding keeps at least this many times the size the resize needs
_ACCEPTED_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM")  # + RIFF....WEBP
# magic bytes of formats we refuse, so the refusal names what the file is
_OTHER_FORMATS = (
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"II+\x00", "BigTIFF"),
    (b"MM\x00+", "BigTIFF"), (b"8BPS", "PSD"), (b"%!PS", "PostScript/EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"%PDF", "PDF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"), (b"\x00\x00\x01\x00", "ICO"),
    (b"icns", "ICNS"), (b"P1", "PBM"), (b"P2", "PGM"), (b"P3", "PPM"), (b"P4", "PBM"), (b"P5", "PGM"), (b"P6", "PPM"),
    (b"P7", "PAM"), (b"qoif", "QOI"), (b"DDS ", "DDS"), (b"\x59\xa6\x6a\x95", "Sun raster"), (b"\x01\xda", "SGI"),
    (b"#?RADIANCE", "HDR"), (b"\x76\x2f\x31\x01", "OpenEXR"), (b"FORM", "IFF"), (b"\x0a", "PCX"),
)
_BOMB_FILTER = ("error", None, Image.DecompressionBombWarning, None, 0)


def _bomb_warning_is_error() -> None:
    """Pillow's decompression-bomb warning is an error here (re-installed if something reset the filters)."""
    if _BOMB_FILTER not in warnings.filters:
        warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


_bomb_warning_is_error()


def set_max_pixels(n: int | None) -> None:
    """Set the process-wide pixel cap (``--max-pixels``); None restores the default."""
    global MAX_PIXELS
    n = DEFAULT_MAX_PIXELS if n is None else int(n)
    if n < 1:
        raise EdgeconvError(f"--max-pixels must be >= 1, got {n}")
    MAX_PIXELS = n
    if Image.MAX_IMAGE_PIXELS is not None and n > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = n  # Pillow's own bomb check must not refuse what the user allowed
    _bomb_warning_is_error()


def _sniff(head: bytes) -> str:
    for magic, fmt in _OTHER_FORMATS:
        if head.startswith(magic):
            return fmt
    return ""


_EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                   5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                   8: Image.Transpose.ROTATE_90}  # EXIF orientation -> the transpose that shows the image upright


def _orientation(img: Image.Image):
    """The EXIF orientation tag, or None; EXIF too corrupt to read is ignored (the pixels may still be fine)."""
    try:
        o = img.getexif().get(0x0112)
    except Exception:
        return None
    return o if o in (1, 2, 3, 4, 5, 6, 7, 8) else None


def _draft_size(need: tuple, orientation) -> tuple:
    # EXIF orientations 5-8 rotate by 90 degrees: the stored image is the transposed one
    return (need[1], need[0]) if orientation in (5, 6, 7, 8) else need


def open_image(src: ImageSource, name: str | None = None, max_pixels: int | None = None,
               draft: tuple | None = None) -> Image.Image:
    """Decode a path, encoded bytes, a PIL image or an HWC uint8 array into a PIL image.

    The one safe decoder of training, calibration and the runtime: only JPEG, PNG, WebP and BMP are
    parsed (others raise UnsupportedImage); the size the header declares is checked against
    ``max_pixels`` (default ``MAX_PIXELS``) before any pixel is decoded (ImageTooLarge); a JPEG at
    least ``DRAFT_MARGIN`` times ``draft`` = (width, height) in both directions is decoded at a
    reduced scale (1/2, 1/4, 1/8) that keeps at least ``DRAFT_MARGIN`` times that size; EXIF
    orientation is applied; every decoding failure is an EdgeconvError naming the image.
    """
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, np.ndarray):
        if src.dtype != np.uint8:
            raise EdgeconvError(f"image array has dtype {src.dtype}; pass HWC uint8 pixels (0-255), or use Model.run for preprocessed float input")
        if src.ndim == 2:
            return Image.fromarray(src, mode="L")
        if src.ndim == 3 and src.shape[2] in (1, 3, 4):
            arr = src[:, :, 0] if src.shape[2] == 1 else src
            return Image.fromarray(np.ascontiguousarray(arr))
        raise EdgeconvError(f"image array has shape {src.shape}; pass HxW or HxWxC (C = 1, 3 or 4) uint8 pixels")
    cap = MAX_PIXELS if max_pixels is None else int(max_pixels)
    _bomb_warning_is_error()
    label = name
    fp = None
    try:
        if isinstance(src, (bytes, bytearray, memoryview)):
            label = label or f"<{len(src)} bytes>"
            if len(src) == 0:
                raise EdgeconvError("image is empty (0 bytes); send an encoded JPEG, PNG, WebP or BMP image")
            fp = io.BytesIO(bytes(src))
        elif isinstance(src, (str, os.PathLike)):
            label = label or str(src)
            if not Path(src).is_file():
                raise EdgeconvError(f"image not found: {src}; check the path")
            fp = open(src, "rb")
        else:
            raise EdgeconvError(f"cannot read an image from a {type(src).__name__}; pass a path, encoded bytes, a PIL image or a uint8 array")
        head = fp.read(16)
        fp.seek(0)
        try:
            img = Image.open(fp, formats=list(ACCEPTED_FORMATS))  # reads the header only
        except UnidentifiedImageError:
            if head.startswith(_ACCEPTED_MAGIC) or head[8:12] == b"WEBP":  # one of ours with a broken header
                raise EdgeconvError(f"cannot decode image {label}: its header is corrupt or truncated; "
                                    f"is it a complete JPEG, PNG, WebP or BMP file?") from None
            other = _sniff(head)
            what = f"a {other} file" if other else "not a recognised image"
            raise UnsupportedImage(f"image {label} is {what}; accepted formats: {_ACCEPTED_TEXT} (convert it to one of them)") from None
        w, h = img.size
        if w < 1 or h < 1:
            raise EdgeconvError(f"image {label} declares an empty size {w}x{h}; is it a complete JPEG, PNG, WebP or BMP file?")
        if w * h > cap:
            raise ImageTooLarge(f"image {label} is {w}x{h} = {w * h} pixels, over the cap of {cap} pixels; "
                                f"downscale it or raise the cap with --max-pixels")
        orientation = None
        if img.format == "JPEG" or img.format == "MPO":
            orientation = _orientation(img)
            if draft is not None:
                need = _draft_size((max(1, int(draft[0])), max(1, int(draft[1]))), orientation)
                if w >= DRAFT_MARGIN * 2 * need[0] and h >= DRAFT_MARGIN * 2 * need[1]:
                    img.draft(img.mode, (DRAFT_MARGIN * need[0], DRAFT_MARGIN * need[1]))
        img.load()
        if orientation is None:
            orientation = _orientation(img)
        if orientation not in (None, 1):  # what ImageOps.exif_transpose does, without re-reading the EXIF
            img = img.transpose(_EXIF_TRANSPOSE[orientation])
        return img
    except EdgeconvError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # Pillow's own limit, below ours
        m = re.search(r"\((\d+) pixels\)", str(exc))
        declared = f"declares {m.group(1)} pixels" if m else "declares too many pixels"
        raise ImageTooLarge(f"image {label} {declared}, over the cap of {min(cap, Image.MAX_IMAGE_PIXELS or cap)} pixels; "
                            f"downscale it or raise the cap with --max-pixels") from None
    except MemoryError:
        raise ImageTooLarge(f"image {label} is too large to decode in the memory available; downscale it or lower --max-pixels") from None
    except Exception as exc:  # OSError, ValueError, SyntaxError, struct.error, EOFError, ...: Pillow's failures
        raise EdgeconvError(f"cannot decode image {label}: {_one_line(exc)}; is it a complete JPEG, PNG, WebP or BMP file?") from None
    finally:
        if fp is not None:
            fp.close()


def declared_pixels(data: bytes) -> int:
    """Width x height that the header of an encoded image declares, nothing decoded; 0 where no accepted header can be
    read (decoding then says why)."""
    try:
        with Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS)) as img:
            return img.size[0] * img.size[1]
    except Exception:
        return 0


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def draft_size(pre: "Preprocess") -> tuple | None:
    """(width, height) the resize policy needs from the decoded image (JPEG draft keeps at least a multiple of it);
    None where the model was trained without draft decoding."""
    if not pre.jpeg_draft:
        return None
    h, w = pre.size
    if pre.resize in ("stretch", "letterbox"):
        return (w, h)
    short = int(round(min(h, w) / pre.crop_pct))
    return (short, short)


def convert_mode(img: Image.Image, channels: int, strict: bool = True) -> Image.Image:
    """Bring ``img`` to L (channels=1) or RGB (channels=3).

    With ``strict``, a grayscale image given to an RGB model is refused: silently copying
    one channel three times hides a data mistake (training data use ``strict=False``).
    """
    if channels == 1:
        return img if img.mode == "L" else img.convert("L")
    if img.mode == "RGB":
        return img
    if strict and img.mode in _GRAY_MODES:
        raise EdgeconvError(
            f"image is grayscale (mode {img.mode}) but the model expects RGB; convert it to RGB first if that is intended"
        )
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA")
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(img, mask=img.getchannel("A"))
        return bg
    return img.convert("RGB")


def resize_image(img: Image.Image, pre: Preprocess, max_pixels: int | None = None) -> Image.Image:
    """Apply the resize policy; returns an image of exactly ``pre.size`` (H, W).

    No step makes an image of more than ``max_pixels`` (default ``MAX_PIXELS``): where shorter_center_crop's resized
    image would (a 1 x 100,000 strip whose short side becomes 224 is 224 x 22.4 M), only the rows or columns the crop
    keeps are resized. Other images resize whole, then crop: the pixels the models were trained on.
    """
    h, w = pre.size
    resample = Image.Resampling.BILINEAR if pre.interpolation == "bilinear" else Image.Resampling.BICUBIC
    if pre.resize == "stretch":
        if img.size != (w, h):
            img = img.resize((w, h), resample)
        return img
    if pre.resize == "letterbox":
        return _letterbox(img, w, h, resample)
    # shorter_center_crop: shorter side to size/crop_pct, then centre crop
    short = int(round(min(h, w) / pre.crop_pct))
    iw, ih = img.size
    if iw <= ih:
        nw, nh = short, max(short, int(round(ih * short / iw)))
    else:
        nw, nh = max(short, int(round(iw * short / ih))), short
    left = (nw - w) // 2
    top = (nh - h) // 2
    if nw * nh > (MAX_PIXELS if max_pixels is None else max_pixels):  # resize only the kept span of the long side
        if nh > nw:
            y0, y1 = max(0, top), min(nh, top + h)
            img, nh, top = img.resize((nw, y1 - y0), resample, box=(0, y0 * ih / nh, iw, y1 * ih / nh)), y1 - y0, top - y0
        else:
            x0, x1 = max(0, left), min(nw, left + w)
            img, nw, left = img.resize((x1 - x0, nh), resample, box=(x0 * iw / nw, 0, x1 * iw / nw, ih)), x1 - x0, left - x0
    elif (nw, nh) != (iw, ih):
        img = img.resize((nw, nh), resample)
    return img.crop((left, top, left + w, top + h))


def load_pixels(src: ImageSource, pre: Preprocess, strict: bool = True, name: str | None = None,
                max_pixels: int | None = None) -> np.ndarray:
    """Decode, convert mode and resize: returns HWC uint8 pixels of the model's size."""
    img = open_image(src, name, max_pixels=max_pixels, draft=draft_size(pre))
    try:
        img = convert_mode(img, pre.channels, strict=strict)
        img = resize_image(img, pre, max_pixels)
        arr = np.asarray(img, dtype=np.uint8)
    except EdgeconvError:
        raise
    except Exception as exc:  # a mode Pillow cannot convert or resize
        label = name or (str(src) if isinstance(src, (str, os.PathLike)) else f"of mode {img.mode}")
        raise EdgeconvError(f"cannot convert image {label} (mode {img.mode}) to {pre.channel_order}: {_one_line(exc)}; "
                            f"save it as an 8-bit RGB or grayscale JPEG, PNG, WebP or BMP file") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def _letterbox(img: Image.Image, w: int, h: int, resample) -> Image.Image:
    """The whole image scaled to fit inside w x h, centred on grey bars."""
    iw, ih = img.size
    k = min(w / iw, h / ih)
    nw, nh = max(1, int(round(iw * k))), max(1, int(round(ih * k)))
    if (nw, nh) != (iw, ih):
        img = img.resize((nw, nh), resample)
    if (nw, nh) == (w, h):
        return img
    canvas = Image.new(img.mode, (w, h), (LETTERBOX_FILL,) * len(img.getbands()))
    canvas.paste(img, ((w - nw) // 2, (h - nh) // 2))
    return canvas


def normalize(pixels: np.ndarray, pre: Preprocess) -> np.ndarray:
    """NHWC (or HWC) uint8 pixels -> NCHW float32 model input: (x * scale - mean) / std.

    The uint8 pixels are moved to NCHW first (a quarter of the bytes of float32) and the
    arithmetic then runs in place over whole contiguous channel planes: the same float32
    operations per element as normalising NHWC (where numpy broadcasts mean/std over an
    inner axis of length 3), about 5x faster at 224x224.
    """
    if pixels.ndim == 3:
        pixels = pixels[None]
    x = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)).astype(np.float32)
    x *= np.float32(pre.scale)
    mean = np.asarray(pre.mean, dtype=np.float32)
    std = np.asarray(pre.std, dtype=np.float32)
    if np.any(mean != 0):
        x -= mean[:, None, None]
    if np.any(std != 1):
        x /= std[:, None, None]
    return x


def check_channel_order(channel_order: str) -> str:
    order = str(channel_order).lower()
    if order not in CHANNEL_ORDERS:
        raise EdgeconvError(f"unknown channel_order {channel_order!r}; use 'rgb' or 'bgr' (OpenCV's frames are BGR)")
    return order


def bgr_to_rgb(src: ImageSource) -> ImageSource:
    """An HWC BGR (or BGRA) array, as OpenCV hands out, in RGB (RGBA) order; anything else unchanged.

    Files, bytes and PIL images carry their own channel order: only arrays can be BGR.
    """
    if isinstance(src, np.ndarray) and src.ndim == 3:
        if src.shape[2] == 3:
            return src[:, :, ::-1]
        if src.shape[2] == 4:
            return src[:, :, [2, 1, 0, 3]]
    return src


def preprocess_images(images: Sequence[ImageSource], pre: Preprocess, strict: bool = True, channel_order: str = "rgb") -> np.ndarray:
    """Many images -> one NCHW float32 batch. ``channel_order="bgr"``: array inputs are BGR (OpenCV's order)."""
    if len(images) == 0:
        raise EdgeconvError("no images given; pass at least one image")
    if check_channel_order(channel_order) == "bgr":
        images = [bgr_to_rgb(im) for im in images]
    return normalize(np.stack([load_pixels(im, pre, strict=strict) for im in images]), pre)
