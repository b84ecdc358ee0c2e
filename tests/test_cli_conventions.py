"""Both command lines: --version, usage lines naming the command typed, no silent abbreviation, a bench table that fits."""
import json
import re
import subprocess
import sys

import pytest

import edgeconv
import edgeconv_runtime
from edgeconv_runtime.bench import TABLE_WIDTH, format_table
from edgeconv_runtime.cli import build_parser


def edgeconv_cli(*args):
    return subprocess.run([sys.executable, "-m", "edgeconv", *args], capture_output=True, text=True, timeout=120)


def runtime_cli(*args):
    return subprocess.run([sys.executable, "-m", "edgeconv_runtime", *args], capture_output=True, text=True, timeout=120)


def test_version_on_both_command_lines():
    r = edgeconv_cli("--version")
    assert r.returncode == 0 and r.stdout == f"edgeconv {edgeconv.__version__}\n", r.stdout + r.stderr
    r = runtime_cli("--version")
    assert r.returncode == 0 and r.stdout == f"edgeconv-runtime {edgeconv_runtime.__version__}\n", r.stdout + r.stderr


@pytest.mark.parametrize("command", ["predict", "bench", "verify"])
def test_usage_names_the_command_typed(command):
    r = edgeconv_cli(command, "--help")  # passed through to the runtime's parser
    assert r.returncode == 0 and r.stdout.startswith(f"usage: edgeconv {command} "), r.stdout[:200]
    assert "edgeconv-runtime" not in r.stdout
    r = runtime_cli(command, "--help")
    assert r.returncode == 0 and r.stdout.startswith(f"usage: edgeconv-runtime {command} "), r.stdout[:200]
    r = edgeconv_cli("export", "--help")  # a click command
    assert r.returncode == 0 and r.stdout.startswith("Usage: edgeconv export ")


def test_no_option_is_abbreviated_on_any_runtime_parser():
    parser = build_parser()
    assert parser.commands  # every subcommand, including ones added later
    for name, sp in parser.commands.items():
        longest = max((o for a in sp._actions for o in a.option_strings if o.startswith("--")), key=len)
        prefix = longest[:-1]
        _, extra = sp.parse_known_args(["x", "x", prefix])  # with abbreviation, argparse would take the prefix as `longest`
        assert prefix in extra, (name, longest)
    _, extra = parser.parse_known_args(["--versio", "backends"])
    assert extra == ["--versio"]


@pytest.mark.parametrize("cli,prog", [(edgeconv_cli, "edgeconv"), (runtime_cli, "edgeconv-runtime")])
def test_batch_size_is_not_taken_for_batch_sizes(cli, prog, tmp_path):
    r = cli("bench", str(tmp_path), "--batch-size", "1")
    assert r.returncode == 2 and r.stdout == ""
    assert f"usage: {prog} bench " in r.stderr and "unrecognized arguments: --batch-size 1" in r.stderr
    assert "did you mean --batch-sizes?" in r.stderr
    r = cli("pred", str(tmp_path))  # nor a subcommand
    assert r.returncode == 2 and ("invalid choice: 'pred'" in r.stderr or "No such command 'pred'" in r.stderr), r.stderr


def test_click_options_are_not_abbreviated(tmp_path):
    r = edgeconv_cli("train", "--data", "mnist-5k", "--model", "chollet_mnist", "--out", str(tmp_path / "o"), "--batch", "8")
    assert r.returncode == 2 and "No such option '--batch'" in r.stderr and not (tmp_path / "o").exists()


def test_bench_table_fits_120_columns_and_prints_no_none(mnist_bundle):
    r = runtime_cli("bench", str(mnist_bundle), "--precision", "fp32,int8", "--batch-sizes", "1,4", "--iterations", "5", "--no-e2e",
                    "--backend", "onnxruntime-cpu,tensorrt")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:4] == ["backend", "precision", "batch", "p50"] and len(lines) >= 5
    assert max(len(l) for l in lines) <= TABLE_WIDTH, r.stdout
    assert "None" not in r.stdout and "nan" not in r.stdout
    row = lines[1].split()
    assert row[:3] == ["onnxruntime-cpu", "fp32", "1"] and row[6] == "-" and row[9] == "-"  # no e2e, no accuracy: '-'
    # the widest row possible: the longest backend name, large figures, the power column
    worst = {"backend": "onnxruntime-tensorrt", "precision": "int8", "batch": 1024, "p50_ms": 12345.678, "p99_ms": 99999.9,
             "throughput_ips": 1234567.8, "e2e_p50_ms": 12345.6, "load_s": 123.456, "first_inference_ms": 98765.4, "accuracy": 0.99,
             "images_per_watt": 12345.6}
    table = format_table({"rows": [worst], "skipped": [{"backend": "tensorrt", "precision": "fp32", "reason": "x " * 200}]})
    assert max(len(l) for l in table.splitlines()) <= TABLE_WIDTH, table
    assert re.search(r"img/s/W$", table.splitlines()[0]) and "None" not in table


def test_predict_takes_images_before_or_after_its_options(mnist_bundle):
    imgs = [str(mnist_bundle / "reference" / "images" / f"00{i}.png") for i in range(2)]
    outs = []
    for args in ([*imgs, "--top-k", "1", "--json"], ["--top-k", "1", "--json", *imgs], [imgs[0], "--json", "--top-k", "1", imgs[1]]):
        r = subprocess.run([sys.executable, "-m", "edgeconv_runtime", "predict", str(mnist_bundle), *args], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        outs.append([p["top"][0]["label"] for p in json.loads(r.stdout)])
    assert outs[0] == outs[1] == outs[2] and len(outs[0]) == 2
    r = subprocess.run([sys.executable, "-m", "edgeconv_runtime", "predict", str(mnist_bundle), "--bogus", imgs[0]], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "unrecognized arguments: --bogus" in r.stderr
