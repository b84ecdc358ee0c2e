"""The runtime installs where PyTorch cannot: alone in a fresh venv, and on aarch64 (Jetson)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Jetson JetPack 4/5/6 ship glibc 2.27 / 2.31 / 2.35: wheels tagged up to manylinux_2_28 install there
AARCH64_PLATFORMS = ["manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_27_aarch64", "manylinux_2_28_aarch64"]


@pytest.mark.slow
def test_runtime_dependencies_have_aarch64_wheels(tmp_path):
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", "3.10", "--implementation", "cp",
           "-d", str(tmp_path)]
    for p in AARCH64_PLATFORMS:
        cmd += ["--platform", p]
    r = subprocess.run(cmd + ["numpy>=1.23", "onnxruntime>=1.16", "pillow>=9.0"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"some runtime dependency has no aarch64 wheel:\n{r.stderr[-2000:]}"
    wheels = [p.name for p in tmp_path.glob("*.whl")]
    for dist in ("numpy", "onnxruntime", "pillow"):
        hits = [w for w in wheels if w.lower().startswith(dist + "-")]
        assert hits and all("aarch64" in w or "none-any" in w for w in hits), (dist, wheels)


@pytest.mark.slow
def test_fresh_venv_with_only_the_runtime_predicts_without_torch(tmp_path, mnist_bundle):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", str(ROOT / "runtime")], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    installed = subprocess.run([str(py), "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True).stdout
    names = {p["name"].lower() for p in json.loads(installed)}
    assert "torch" not in names and "edgeconv-runtime" in names
    image = mnist_bundle / "reference" / "images" / "000.png"
    code = (
        "import sys, json\n"
        "from edgeconv_runtime import Model\n"
        f"m = Model.load({str(mnist_bundle)!r})\n"
        f"p = m.predict({str(image)!r}, top_k=1)\n"
        "assert m.verify()['ok']\n"
        "assert 'torch' not in sys.modules\n"
        "print(json.dumps(p.to_dict()))\n"
    )
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["top"][0]["label"] in [str(i) for i in range(10)]
    r = subprocess.run([str(venv / "bin" / "edgeconv-runtime"), "verify", str(mnist_bundle)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "verify OK" in r.stdout
