"""The runtime on plain ONNX files (no bundle, no edgeconv metadata), as trtexec and Polygraphy users run them:
bench with random or --data inputs, predict printing class indices, verify refusing in one line."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest


def runtime(*args):
    return subprocess.run([sys.executable, "-m", "edgeconv_runtime", *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """A small real convnet saved by plain torch.onnx.export: fixed batch 1, dynamic batch and size, and NHWC input."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=2), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 5)).eval()

    class NHWC(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x.permute(0, 3, 1, 2))

    root = tmp_path_factory.mktemp("plain")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, 64, 64),), str(root / "fixed.onnx"), dynamo=False)
        torch.onnx.export(net, (torch.zeros(1, 3, 64, 64),), str(root / "open.onnx"), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
        torch.onnx.export(NHWC(), (torch.zeros(1, 64, 64, 3),), str(root / "nhwc.onnx"), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "n"}})
    return root


def test_bench_random_inputs_fixed_batch(graphs, tmp_path):
    r = runtime("bench", graphs / "fixed.onnx", "--duration", 0.2, "--warmup", 1, "--json", tmp_path / "b.json")
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["model"] == "fixed" and [row["batch"] for row in result["rows"]] == [1]
    assert result["rows"][0]["backend"] == "onnxruntime-cpu" and result["rows"][0]["accuracy"] is None
    assert "skipped batch 8: the graph fixes its batch size to 1" in r.stdout


def test_bench_open_dims_need_shape_then_data_images(graphs, catsdogs_dir, tmp_path):
    r = runtime("bench", graphs / "open.onnx", "--duration", 0.2)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--shape" in r.stderr, r.stderr
    r = runtime("bench", graphs / "open.onnx", "--shape", "3,64,64", "--batch-sizes", "1,4", "--duration", 0.2, "--warmup", 1)
    assert r.returncode == 0, r.stderr
    assert [line.split()[2] for line in r.stdout.splitlines()[1:]] == ["1", "4"]
    r = runtime("bench", graphs / "nhwc.onnx", "--data", catsdogs_dir / "test", "--batch-sizes", "2", "--duration", 0.2,
                "--json", tmp_path / "d.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "d.json").read_text())["rows"][0]["batch"] == 2
    r = runtime("bench", graphs / "open.onnx", "--shape", "3,32", "--duration", 0.2)
    assert r.returncode == 2 and "does not fit" in r.stderr


def test_predict_prints_indices_verify_refuses(graphs, catsdogs_dir):
    files = sorted((catsdogs_dir / "test" / "cats").iterdir())[:3]
    r = runtime("predict", graphs / "fixed.onnx", *files, "--top-k", 2)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith(str(f)) for line, f in zip(lines, files))
    tops = [line.split(": ", 1)[1].split() for line in lines]
    assert all(t[0] in "01234" and t[2] in "01234" and abs(float(t[1]) + float(t[3]) - 1) < 1.0 for t in tops)
    assert "no labels or preprocessing" in r.stderr
    r = runtime("predict", graphs / "fixed.onnx", files[0], "--json")
    top = json.loads(r.stdout)[0]["top"][0]
    assert top["label"] == str(top["index"])
    r = runtime("verify", graphs / "fixed.onnx")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no reference inputs" in r.stderr, r.stderr
    r = runtime("predict", graphs / "nhwc.onnx", files[0])
    assert r.returncode == 2 and "--layout nhwc" in r.stderr and r.stderr.count("\n") == 1, r.stderr
