"""`edgeconv demo` on the user's own data (issue 25, point 5): --data, --model, --strategy, --precision, --tune.
The embedded MNIST default stays as it was (test_cli.py::test_main_job_demo_chain); here: the new options parse,
bad input is one line before any training, one small real run on an IDX directory with its own test split, and
--tune's wiring to edgeconv_runtime.tune with a fake tuner in sys.modules (the real tuner is not run here)."""
import dataclasses
import struct
import subprocess
import sys
import types
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from click.testing import CliRunner

from edgeconv.cli import cli
from edgeconv.pipeline import TUNE_BUDGET_S, DemoConfig, evaluation_folder, parse_precisions

TUNE = "edgeconv_runtime.tune"


def demo(*args):
    """`edgeconv demo ARGS` in this process: (exit code, stdout, stderr)."""
    r = CliRunner().invoke(cli, ["demo", *map(str, args)])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.stdout, r.stderr


def fake_tuner(calls: list) -> types.ModuleType:
    """A stand-in for edgeconv_runtime.tune with the API the demo calls; records each run_tune config."""
    mod = types.ModuleType(TUNE)

    @dataclasses.dataclass
    class TuneConfig:
        bundle: str
        data: Optional[str] = None
        objective: str = "latency"
        budget_s: float = 300.0

    def run_tune(cfg):
        calls.append(cfg)
        return {"chosen": {"backend": "fake-backend", "precision": "fp32", "batch": 1}, "rows": []}

    def format_tune_table(result):
        return f"FAKE TUNE TABLE chosen {result['chosen']['backend']}"

    mod.TuneConfig, mod.run_tune, mod.format_tune_table = TuneConfig, run_tune, format_tune_table
    return mod


def write_idx(path: Path, array: np.ndarray) -> None:
    path.write_bytes(struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes())


def image_folder(root: Path, splits=("train",), classes=("ants", "bees")) -> Path:
    """A minimal image folder (one 8x8 PNG per class) with the given split folders ('' for class folders at the root)."""
    from PIL import Image

    for split in splits:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            Image.new("RGB", (8, 8), (40, 80, 120)).save(d / "a.png")
    return root


# ------------------------------------------------------------------------------------------------ options
def test_demo_options_exist_with_the_config_defaults_and_parse():
    import click

    from edgeconv.training.config import STRATEGIES

    cmd = cli.commands["demo"]
    with click.Context(cmd) as ctx:
        opts = {p.name: p for p in cmd.get_params(ctx) if isinstance(p, click.Option)}
    fields = {f.name: f.default for f in dataclasses.fields(DemoConfig)}
    assert {"data", "model", "strategy", "precisions", "tune"} <= set(opts)
    assert opts["precisions"].opts == ["--precision"] and opts["precisions"].default == ",".join(fields["precisions"]) == "fp32,int8"
    assert {n: opts[n].default for n in ("data", "model", "strategy", "epochs")} == {n: fields[n] for n in ("data", "model", "strategy", "epochs")}
    assert opts["tune"].is_flag and opts["tune"].default is False
    assert tuple(opts["strategy"].type.choices) == STRATEGIES

    ctx = cmd.make_context("demo", ["--data", "mnist-5k", "--model", "chollet_mnist", "--strategy", "scratch", "--precision", "fp32,fp16",
                                    "--tune", "--epochs", "2"])
    assert {k: ctx.params[k] for k in ("data", "model", "strategy", "precisions", "tune", "epochs")} == {
        "data": "mnist-5k", "model": "chollet_mnist", "strategy": "scratch", "precisions": "fp32,fp16", "tune": True, "epochs": 2}
    ctx = cmd.make_context("demo", [])  # `make demo`: the embedded default, as before
    assert ctx.params["data"] is None and ctx.params["model"] is None and ctx.params["tune"] is False
    assert DemoConfig().embedded and DemoConfig(model="chollet_mnist").embedded and not DemoConfig(data="mnist-5k").embedded
    tc = DemoConfig(out="o").train_config("t10k")
    assert (tc.data, tc.model, tc.epochs, tc.optimizer, tc.lr, tc.lr_schedule, tc.augment_preset, tc.dropout) == (
        "mnist-5k", "chollet_mnist", 30, "adam", 2e-3, "cosine", "digits", 0.25)  # the embedded recipe, unchanged
    tc = DemoConfig(out="o", data="mnist-5k").train_config(None)
    assert (tc.model, tc.epochs, tc.optimizer, tc.lr, tc.augment) == ("chollet_mnist", 10, None, None, False)  # as `edgeconv train`


def test_precision_list_is_parsed_like_export():
    assert parse_precisions("fp32, INT8,fp32") == ("fp32", "int8")
    assert parse_precisions(("fp16",)) == ("fp16",)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "args,needle",
    [
        (["--data", "/no/such/dir"], "data path not found: /no/such/dir"),
        (["--data", "mnist-5k", "--model", "resnet9000"], "unknown model 'resnet9000'"),
        (["--model", "resnet9000"], "unknown model 'resnet9000'"),
        (["--precision", "fp32,int9"], "unknown precision 'int9'; use a comma list of fp32, fp16, int8"),
        (["--precision", "onnx"], "unknown precision 'onnx'"),
        (["--strategy", "fine-tune"], "chollet_mnist has no pretrained weights"),
        (["--data", "mnist-5k", "--epochs", "0"], "--epochs must be at least 1"),
        (["--data", "IMAGES"], "is an image folder: pass --model NAME"),
        (["--data", "mnist-5k", "--test-data", "/no/such/t10k"], "data path not found: /no/such/t10k"),
    ],
)
def test_bad_demo_input_is_one_line_before_training(tmp_path, args, needle):
    args = [str(image_folder(tmp_path / "imgs")) if a == "IMAGES" else a for a in args]
    code, out, err = demo(*args, "--out", tmp_path / "run")
    assert code == 2 and "Traceback" not in out + err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not (tmp_path / "run").exists()  # refused before training wrote anything


def test_tune_without_the_tuner_is_one_line_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, TUNE, None)  # as if edgeconv_runtime/tune.py were not there: importing it fails
    code, out, err = demo("--data", "mnist-5k", "--tune", "--out", tmp_path / "run")
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and "Traceback" not in out + err and len(lines) == 1, err
    assert lines[0].startswith("error: --tune needs the runtime's tuner, edgeconv_runtime.tune"), err
    assert not (tmp_path / "run").exists()


def test_bad_demo_input_in_a_real_process_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "edgeconv", "demo", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: data path not found"), r.stderr


# ------------------------------------------------------------------------------------------------ the tuner's images
def test_tune_images_are_the_image_folder_accuracy_is_measured_on(tmp_path, hymenoptera_dir):
    assert evaluation_folder(str(hymenoptera_dir)) == str((hymenoptera_dir / "val").resolve())  # train/ + val/: the val split
    three = image_folder(tmp_path / "three", ("train", "validation", "test"))
    assert evaluation_folder(str(three)) == str((three / "test").resolve())
    flat = image_folder(tmp_path / "flat", ("",))  # class folders only: the split is carved from them, no folder of its own
    assert evaluation_folder(str(flat)) is None
    assert evaluation_folder(str(flat), test_data=str(three)) == str((three / "test").resolve())
    assert evaluation_folder(str(three), test_data=str(flat)) == str(flat.resolve())  # --test-data without splits: all of it
    assert evaluation_folder("mnist-5k") is None  # array data: the tuner uses the bundle's own reference inputs


# ------------------------------------------------------------------------------------------------ one real run
@pytest.fixture(scope="module")
def mnist_idx_small(tmp_path_factory, mnist_test_dir) -> Path:
    """An IDX directory of real MNIST digits, small: 1,000 training and 300 test images (its own test split)."""
    from edgeconv.data import read_idx

    root = tmp_path_factory.mktemp("mnist_idx_small")
    for prefix, n in (("train", 1000), ("t10k", 300)):
        for kind, ndim in (("images", 3), ("labels", 1)):
            write_idx(root / f"{prefix}-{kind}-idx{ndim}-ubyte", read_idx(str(mnist_test_dir / f"{prefix}-{kind}-idx{ndim}-ubyte.gz"))[:n])
    return root


@pytest.fixture(scope="module")
def idx_demo(tmp_path_factory, mnist_idx_small):
    """`edgeconv demo --data IDX --epochs 1 --precision fp32 --tune`, run once in this process with a fake tuner."""
    out = tmp_path_factory.mktemp("idx_demo") / "run"
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, TUNE, fake_tuner(calls))
        code, stdout, stderr = demo("--data", mnist_idx_small, "--epochs", "1", "--precision", "fp32", "--tune", "--out", out)
    return types.SimpleNamespace(out=out, code=code, stdout=stdout, stderr=stderr, calls=calls)


def test_demo_on_an_idx_directory_end_to_end(idx_demo, mnist_idx_small):
    r = idx_demo
    assert r.code == 0, r.stdout + r.stderr
    assert f"train chollet_mnist on {mnist_idx_small} (1 epochs), test on its test split" in r.stdout
    assert "(300 test images for accuracy)" in r.stdout and "verify fp32: OK" in r.stdout
    table = r.stdout[r.stdout.index("backend "):].splitlines()
    rows = [l.split() for l in table[2:] if l.strip() and not l.startswith(("FAKE", "run directory"))]
    assert {(row[0], row[1]) for row in rows if row[0] == "pytorch-eager"} == {("pytorch-eager", "fp32")}
    runtime = [row for row in rows if row[0] != "pytorch-eager"]
    assert runtime and {row[1] for row in runtime} == {"fp32"} and all(row[-1] == "ok" for row in runtime), table  # only what was exported
    assert sorted(int(row[2]) for row in runtime) == [1, 32]
    assert all(float(row[3]) > 0.3 for row in rows), table  # one epoch on 900 real digits (about 0.6); chance is 0.1
    assert (r.out / "bundle" / "manifest.json").is_file() and (r.out / "bundle" / "model.onnx").is_file()
    assert not (r.out / "bundle" / "model.int8.onnx").exists()


def test_demo_tune_calls_the_runtime_tuner_on_the_bundle_and_prints_its_table_last(idx_demo):
    r = idx_demo
    assert r.code == 0, r.stdout + r.stderr
    assert len(r.calls) == 1
    cfg = r.calls[0]
    assert (cfg.bundle, cfg.data, cfg.objective, cfg.budget_s) == (str(r.out / "bundle"), None, "latency", TUNE_BUDGET_S) and TUNE_BUDGET_S == 60.0
    assert "[5/5] tune" in r.stdout
    assert r.stdout.index("backend ") < r.stdout.index("FAKE TUNE TABLE chosen fake-backend") < r.stdout.index("run directory:")
