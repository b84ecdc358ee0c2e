import subprocess
import sys

import pytest


def edgeconv(*args, timeout=120):
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
                 "--out", str(out), "--export", "onnx,int8", timeout=300)
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
