import subprocess
import sys

import pytest


def edgeconv(*args, timeout=540):  # generous: a loaded machine may be slow, never red (the test itself has 600 s)
    return subprocess.run([sys.executable, "-m", "edgeconv", *args], capture_output=True, text=True, timeout=timeout)


def test_models_lists_parameter_counts_and_input_size():
    r = edgeconv("models")
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if l.startswith("chollet_mnist"))
    assert "93,322" in line and "28x28x1" in line
    assert "150x150x3" in next(l for l in r.stdout.splitlines() if l.startswith("chollet_catsdogs"))


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--data", "/no/such/dir", "--model", "chollet_mnist"], "data path not found: /no/such/dir"),
        (["--data", "mnist-5k", "--model", "resnet9000"], "unknown model 'resnet9000'"),
        (["--data", "mnist-5k", "--model", "chollet_mnist", "--epochs", "0"], "--epochs must be at least 1"),
        (["--data", "mnist-5k", "--model", "chollet_mnist", "--size", "64"], "needs image folders"),
    ],
)
def test_bad_input_is_one_line_without_traceback(tmp_path, args, needle):
    r = edgeconv("train", *args, "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr


def test_train_command_end_to_end(tmp_path, mnist_test_dir):
    out = tmp_path / "cli_run"
    r = edgeconv("train", "--data", "mnist-5k", "--test-data", str(mnist_test_dir), "--model", "chollet_mnist",
                 "--epochs", "1", "--optimizer", "adam", "--lr", "0.002", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "test_accuracy 0.9" in r.stdout  # one epoch on 4,500 digits already beats 90 %
    assert (out / "metrics.json").is_file()


def test_train_then_export_in_one_command(tmp_path, mnist_test_dir):
    out = tmp_path / "te"
    r = edgeconv("train", "--data", "mnist-5k", "--test-data", str(mnist_test_dir), "--model", "chollet_mnist", "--epochs", "1",
                 "--out", str(out), "--export", "onnx,int8")
    assert r.returncode == 0, r.stderr
    assert (out / "bundle" / "model.onnx").is_file() and (out / "bundle" / "model.int8.onnx").is_file()
    assert "model.int8.onnx" in r.stdout


def test_export_target_typo_is_refused_before_training(tmp_path):
    r = edgeconv("train", "--data", "mnist-5k", "--model", "chollet_mnist", "--epochs", "1", "--out", str(tmp_path / "t"), "--export", "onnx,int9")
    assert r.returncode == 2 and "unknown export target 'int9'" in r.stderr
    assert not (tmp_path / "t" / "model.pt").exists()


def test_main_job_demo_chain(tmp_path, mnist_test_dir):
    """`make demo`'s command, shortened to one epoch: train -> export -> verify -> bench, one table."""
    out = tmp_path / "demo"
    r = edgeconv("demo", "--epochs", "1", "--out", str(out), "--test-data", str(mnist_test_dir), "--json", str(tmp_path / "demo.json"), timeout=600)
    assert r.returncode == 0, r.stderr
    assert "verify fp32: OK" in r.stdout and "verify int8: OK" in r.stdout
    import json

    rows = json.loads((tmp_path / "demo.json").read_text())["rows"]
    from edgeconv_runtime import available_backends
    from edgeconv_runtime.backends import auto_order

    status = available_backends()
    chosen = {p: next(n for n in auto_order(p) if status[n][0]) for p in ("fp32", "int8")}  # what `auto` runs here
    assert {(x["backend"], x["precision"]) for x in rows} == {("pytorch-eager", "fp32"), (chosen["fp32"], "fp32"), (chosen["int8"], "int8")}
    assert all(x["accuracy"] > 0.8 and x["p50_ms"] > 0 for x in rows), rows  # one augmented epoch; chance is 0.1


def test_command_line_loads_without_torch():
    """`edgeconv --version` and the runtime passthroughs stay fast: train/export/demo build their options on first use."""
    code = ("import sys\nfrom click.testing import CliRunner\nfrom edgeconv.cli import cli\n"
            "for args in (['--version'], ['--help'], ['predict', '--help']):\n"
            "    r = CliRunner().invoke(cli, args)\n"
            "    assert r.exit_code == 0, (args, r.output)\n"
            "assert 'torch' not in sys.modules, 'importing torch'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def _options(command: str) -> dict:
    """{parameter name: click.Option} of an `edgeconv` command, as its --help and parser see them."""
    import click

    from edgeconv.cli import cli

    cmd = cli.commands[command]
    with click.Context(cmd) as ctx:
        cmd.get_params(ctx)  # builds the deferred options
    return {p.name: p for p in cmd.params if isinstance(p, click.Option)}


def _fields(cls) -> dict:
    import dataclasses

    return {f.name: f.default for f in dataclasses.fields(cls)}


def test_train_options_are_train_config_fields_with_its_defaults_and_names():
    from edgeconv.augment import PRESETS
    from edgeconv.models.chollet import DOWNSAMPLING
    from edgeconv.training import TrainConfig
    from edgeconv.training.config import OPTIMIZERS, SCHEDULES, STRATEGIES
    from edgeconv_runtime.preprocess import RESIZE_POLICIES

    opts, fields = _options("train"), _fields(TrainConfig)
    assert set(fields) - set(opts) == {"progress"}, "a TrainConfig field without a train option"
    assert set(opts) - set(fields) == {"resume_dir", "export_targets", "from_run"}  # --from: QAT on a finished run, not a training setting
    for name, default in fields.items():
        if name in opts and name not in ("data", "model", "out"):  # required unless --resume
            assert opts[name].default == default, (name, opts[name].default, default)
    choices = {"optimizer": OPTIMIZERS, "lr_schedule": SCHEDULES, "strategy": STRATEGIES, "augment_preset": tuple(PRESETS),
               "downsample": DOWNSAMPLING, "resize": RESIZE_POLICIES}
    for name, names in choices.items():
        assert tuple(opts[name].type.choices) == tuple(names), name


def test_export_and_demo_options_take_their_defaults_from_the_dataclasses():
    from edgeconv.exporting import ExportRequest
    from edgeconv.pipeline import DemoConfig
    from edgeconv_export.precision import CALIBRATION_METHODS

    opts, fields = _options("export"), _fields(ExportRequest)
    for name in ("calib_size", "calibration_method", "opset", "max_accuracy_drop", "batch_min", "batch_opt", "batch_max", "force"):
        assert opts[name].default == fields[name], name
    assert opts["precision"].default == ",".join(fields["precisions"]) and opts["fmt"].default == ",".join(fields["formats"])
    assert tuple(opts["calibration_method"].type.choices) == CALIBRATION_METHODS
    opts, fields = _options("demo"), _fields(DemoConfig)
    assert {n: opts[n].default for n in ("out", "epochs", "test_data", "json_path")} == {n: fields[n] for n in ("out", "epochs", "test_data", "json_path")}


def test_demo_exit_code_is_the_verify_outcome():
    from edgeconv.pipeline import DemoResult

    def result(*verdicts):
        rows = [{"backend": "pytorch-eager"}] + [{"backend": "onnxruntime-cpu", "verify": v} for v in verdicts]
        return DemoResult(out=None, bundle=None, train={}, manifest=None, rows=rows)

    assert result("ok", "ok").exit_code == 0
    assert result("ok", "FAILED").exit_code == 1


def test_export_format_triton_writes_a_model_repository(tmp_path, mnist_run):
    repo = tmp_path / "repo"
    r = edgeconv("export", str(mnist_run), "--out", str(repo), "--format", "triton", "--precision", "int8", "--batch-max", "16", timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Triton model repository: chollet_mnist/1/model.onnx (onnxruntime_onnx, int8, max_batch_size 16)" in r.stdout, r.stdout
    config = (repo / "chollet_mnist" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and "max_batch_size: 16" in config
    assert (repo / "chollet_mnist" / "labels.txt").read_text().split() == [str(i) for i in range(10)]
    r = edgeconv("export", str(mnist_run), "--out", str(repo), "--format", "triton")
    assert r.returncode == 2 and "already exists; pass --force" in r.stderr
