"""Installs that work on each target: dependency design, mixed onnxruntime builds named with their fix, Python 3.8.

The slow, networked halves live in scripts/check_install.sh (fresh venvs with the real CPU and GPU wheels)
and scripts/py38_check.sh (a 3.8 venv running verify and predict); these tests guard the same lines fast.
"""
import ast
import glob
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from edgeconv_runtime import ortbuild

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_SRC = ROOT / "runtime" / "edgeconv_runtime"
RUNTIME_FILES = sorted(RUNTIME_SRC.rglob("*.py"))
# the last releases with Python 3.8 wheels, and the first ones without
LAST_FOR_38 = {"numpy": ("1.24.4", "1.25.0"), "onnxruntime": ("1.19.2", "1.20.0"), "pillow": ("10.4.0", "11.0.0")}


def _pyproject(part: str) -> dict:
    with open(ROOT / part / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def _applicable(reqs, python_version: str) -> dict:
    """{name: Requirement} of the base requirements whose marker holds on that Python."""
    env = {"python_version": python_version, "python_full_version": python_version + ".0", "extra": ""}
    out = {}
    for line in reqs:
        r = Requirement(line)
        if r.marker is None or r.marker.evaluate(env):
            assert r.name not in out, f"two requirements on {r.name} apply to Python {python_version}"
            out[r.name] = r
    return out


def test_no_extra_can_install_a_second_onnxruntime_build():
    project = _pyproject("runtime")
    for extra, reqs in project["optional-dependencies"].items():
        names = {Requirement(r).name for r in reqs}
        assert not names & set(ortbuild.ORT_DISTS), f"[{extra}] would put a second onnxruntime build beside the base one"


@pytest.mark.parametrize("python_version", ["3.8", "3.9", "3.10", "3.12"])
def test_base_is_a_working_cpu_runtime_on_every_python(python_version):
    project = _pyproject("runtime")
    from packaging.specifiers import SpecifierSet

    assert Version(python_version + ".0") in SpecifierSet(project["requires-python"])
    reqs = _applicable(project["dependencies"], python_version)
    assert set(reqs) == {"numpy", "onnxruntime", "pillow"}, reqs
    if python_version == "3.8":
        for name, (last, first_without) in LAST_FOR_38.items():
            assert reqs[name].specifier.contains(last), f"{name} {last} (last with 3.8 wheels) excluded on 3.8"
            assert not reqs[name].specifier.contains(first_without), f"{name} {first_without} has no 3.8 wheels"


def _cuda_major(extra_reqs) -> int:
    reqs = {Requirement(r).name: Requirement(r) for r in extra_reqs}
    trt = [n for n in reqs if n.startswith("tensorrt-cu")]
    assert len(trt) == 1, extra_reqs
    major = int(trt[0][len("tensorrt-cu"):])
    spec = reqs["cuda-python"].specifier
    assert spec.contains(f"{major}.0.0") and spec.contains(f"{major}.9.9"), f"cuda-python {spec} misses CUDA {major}"
    assert not spec.contains(f"{major + 1}.0.0") and not spec.contains(f"{major - 1}.9.9"), f"cuda-python {spec} is not pinned to {major}"
    return major


@pytest.mark.parametrize("part", ["runtime", "export"])
def test_tensorrt_extras_pin_one_cuda_major(part):
    extras = _pyproject(part)["optional-dependencies"]
    assert _cuda_major(extras["tensorrt-cu12"]) == 12
    assert _cuda_major(extras["tensorrt-cu13"]) == 13
    assert sorted(extras["tensorrt"]) == sorted(extras["tensorrt-cu12"]), "`tensorrt` is documented as the CUDA 12 one"
    if part == "export":
        runtime = _pyproject("runtime")["optional-dependencies"]
        for name in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13"):
            assert sorted(extras[name]) == sorted(runtime[name]), name


def _at_least_as_strict(root: Requirement, part: Requirement) -> bool:
    """Every clause of ``part``'s specifier is in ``root``'s, or a bound of the same direction there is tighter."""
    tighter = {">=": lambda r, p: r >= p, ">": lambda r, p: r >= p, "<=": lambda r, p: r <= p, "<": lambda r, p: r <= p}
    for clause in part.specifier:
        same_way = [c for c in root.specifier if c.operator == clause.operator]
        if clause not in root.specifier and not (clause.operator in tighter and
                                                 any(tighter[clause.operator](Version(c.version), Version(clause.version)) for c in same_way)):
            return False
    return True


@pytest.mark.parametrize("part", ["runtime", "export"])
def test_root_distribution_carries_what_the_packages_it_ships_need(part):
    """`pip install .` ships edgeconv_runtime and edgeconv_export itself, so it must ask for their dependencies
    (as strictly) and offer the runtime's extras under the same names."""
    root, sub = _pyproject("."), _pyproject(part)
    python = root["requires-python"].removeprefix(">=")
    root_reqs, sub_reqs = _applicable(root["dependencies"], python), _applicable(sub["dependencies"], python)
    for name, req in sub_reqs.items():
        if name.startswith("edgeconv"):
            continue  # shipped inside the root distribution
        assert name in root_reqs, f"{part} needs {req}; the root distribution does not ask for {name}"
        assert _at_least_as_strict(root_reqs[name], req), f"root asks for {root_reqs[name]}, {part} for {req}"
    assert not [n for n in root_reqs if n.startswith("edgeconv")]
    for extra, reqs in sub.get("optional-dependencies", {}).items():
        assert sorted(root["optional-dependencies"].get(extra, [])) == sorted(reqs), f"root extra [{extra}] differs from {part}'s"


def test_requirement_strictness_check_sees_a_looser_root():
    assert _at_least_as_strict(Requirement("onnxruntime>=1.27"), Requirement("onnxruntime>=1.16"))
    assert not _at_least_as_strict(Requirement("onnxruntime>=1.16"), Requirement("onnxruntime>=1.27"))
    assert not _at_least_as_strict(Requirement("torch>=2.4"), Requirement("torch>=2.4,<=2.14.1"))


def test_readme_documents_the_command_the_runtime_prints():
    readme = (ROOT / "README.md").read_text()
    assert "## Install on your device" in readme
    assert f"pip install ./runtime && {ortbuild.gpu_install_command(jetson=False)}" in readme
    assert ortbuild.JETSON_JP6_INDEX in readme and "--system-site-packages" in readme


def _backends(extra_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(extra_path), str(ROOT / "runtime")]))
    return subprocess.run([sys.executable, "-m", "edgeconv_runtime", "backends"], capture_output=True, text=True, env=env, timeout=120)


def _row(stdout: str, name: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith(name + " "))


def test_cpu_build_beside_gpu_metadata_is_named_with_the_fix(tmp_path):
    # pip's record of an onnxruntime-gpu install (what `pip install onnxruntime-gpu` leaves in site-packages)
    # beside the real CPU onnxruntime: the state `./runtime[gpu]` used to produce. check_install.sh makes
    # the same state with the real GPU wheel and runs the printed fix.
    info = tmp_path / "onnxruntime_gpu-1.31.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.31.1\n")
    r = _backends(tmp_path)
    assert r.returncode == 0, r.stderr
    cuda = _row(r.stdout, "onnxruntime-cuda")
    assert "onnxruntime-gpu 1.31.1 are both installed" in cuda and "holds onnxruntime's files" in cuda, cuda
    assert "fix: pip uninstall -y onnxruntime onnxruntime-gpu && pip install" in cuda, cuda
    assert "runtime[gpu]" not in r.stdout
    assert " yes " in _row(r.stdout, "onnxruntime-cpu")


def test_onnxruntime_that_raises_oserror_at_import_is_a_reason_not_a_crash(tmp_path):
    # a broken CUDA install: the package is found, its import raises OSError (not ImportError)
    pkg = tmp_path / "onnxruntime"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise OSError('libcudnn.so.9: cannot open shared object file: No such file or directory')\n")
    r = _backends(tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    for name in ("onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-tensorrt"):
        row = _row(r.stdout, name)
        assert " no " in row and "importing onnxruntime failed (OSError: libcudnn.so.9: cannot open" in row, row
    assert _row(r.stdout, "tensorrt")


# ---------------------------------------------------------------- Python 3.8 (JetPack 5)
def _python38():
    candidates = [shutil.which("python3.8")] + sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.8*/bin/python")))
    for exe in filter(None, candidates):
        try:
            r = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2] == (3, 8))"], capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if r.stdout.strip() == "True":  # a pyenv shim for an inactive version exits non-zero: skip it
            return exe
    return None


def test_every_runtime_module_compiles_on_python38():
    exe = _python38()
    if exe is None:
        pytest.skip("no Python 3.8 interpreter (python3.8 on PATH or ~/.pyenv/versions/3.8*)")
    code = textwrap.dedent("""
        import sys
        bad = []
        for path in sys.argv[1:]:
            try:
                compile(open(path, encoding="utf-8").read(), path, "exec")
            except SyntaxError as e:
                bad.append(f"{path}:{e.lineno}: {e.msg}")
        print("\\n".join(bad))
        sys.exit(1 if bad else 0)
    """)
    r = subprocess.run([exe, "-c", code, *map(str, RUNTIME_FILES)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"not Python 3.8 syntax (JetPack 5):\n{r.stdout}{r.stderr}"


BUILTIN_GENERICS = {"list", "dict", "tuple", "set", "frozenset", "type"}


def py38_runtime_problems(source: str, filename: str = "<src>") -> list:
    """What Python 3.8 rejects at run time though it compiles: evaluated builtin generics, 3.9+ names."""
    tree = ast.parse(source, filename)
    annotations = set()
    for node in ast.walk(tree):
        for ann in (getattr(node, "annotation", None), getattr(node, "returns", None)):
            if ann is not None:
                annotations.update(id(n) for n in ast.walk(ann))
    has_future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and any(a.name == "annotations" for a in n.names)
                     for n in tree.body)
    problems = []
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if id(node) in annotations:
            if not has_future and isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in BUILTIN_GENERICS:
                problems.append(f"{where}: {node.value.id}[...] annotation without `from __future__ import annotations`")
            if not has_future and isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
                problems.append(f"{where}: X | Y annotation without `from __future__ import annotations`")
            continue
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in BUILTIN_GENERICS:
            problems.append(f"{where}: {node.value.id}[...] evaluated at run time (typing.{node.value.id.title()} on 3.8)")
        if isinstance(node, ast.Attribute) and node.attr in ("removeprefix", "removesuffix"):
            problems.append(f"{where}: str.{node.attr} is 3.9+")
        if isinstance(node, ast.Attribute) and node.attr == "cache" and isinstance(node.value, ast.Name) and node.value.id == "functools":
            problems.append(f"{where}: functools.cache is 3.9+ (lru_cache(maxsize=None))")
        if isinstance(node, ast.ImportFrom) and node.module == "functools" and any(a.name == "cache" for a in node.names):
            problems.append(f"{where}: functools.cache is 3.9+ (lru_cache(maxsize=None))")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "zip" and any(k.arg == "strict" for k in node.keywords):
                problems.append(f"{where}: zip(strict=) is 3.10+")
            if node.func.id in ("isinstance", "issubclass") and len(node.args) == 2 and isinstance(node.args[1], ast.BinOp):
                problems.append(f"{where}: {node.func.id}(x, A | B) is 3.10+")
    return problems


def test_py38_checker_flags_what_it_should():
    bad = textwrap.dedent("""
        import functools
        Shape = tuple[int, int]
        def f(x: list[int]) -> dict[str, int]:
            return isinstance(x, int | str) or "a".removeprefix("b") or zip([1], [2], strict=True)
        @functools.cache
        def g(): pass
    """)
    found = "\n".join(py38_runtime_problems(bad))
    for expected in ("tuple[...] evaluated", "list[...] annotation without", "isinstance(x, A | B)", "removeprefix", "zip(strict=)",
                     "functools.cache"):
        assert expected in found, (expected, found)
    good = "from __future__ import annotations\nimport typing\nShape = typing.Tuple[int, int]\ndef f(x: list[int] | None) -> dict[str, int]: ...\n"
    assert py38_runtime_problems(good) == []


@pytest.mark.parametrize("path", RUNTIME_FILES, ids=lambda p: str(p.relative_to(RUNTIME_SRC)))
def test_runtime_module_has_no_py39_only_constructs(path):
    assert py38_runtime_problems(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT))) == []
