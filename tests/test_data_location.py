"""Where the real test data lives (issue 24 §6): one folder, $EDGECONV_DATA (default ../shared/data, beside the
checkout), read by the tests, `make demo` and the benchmarks; without it the data-bound tests skip, and the summary
says how many skipped for that reason. Each case runs pytest in a subprocess with this suite's conftest as a plugin."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

TINY = '''
from pathlib import Path

import conftest

def test_mnist(mnist_test_dir):
    print("MNIST AT", mnist_test_dir)

def test_hymenoptera(hymenoptera_dir):
    pass

def test_required_by_hand():
    conftest.require(conftest.SHARED / "cats_and_dogs_small" / "test")

def test_needs_no_data():
    pass
'''


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "EDGECONV_DATA")}
    # no plugin autoloading: pytest starts in a quarter of the time on a loaded machine
    return {**env, "PYTHONPATH": str(TESTS), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", **extra}


def _pytest(cwd: Path, *args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", *args], cwd=cwd,
                          env=_env(**env), capture_output=True, text=True, timeout=400)


def test_missing_data_skips_and_the_summary_counts_them(tmp_path):
    empty = tmp_path / "no-data"
    empty.mkdir()
    (tmp_path / "test_tiny.py").write_text(TINY)
    r = _pytest(tmp_path, "-q", "-rs", "test_tiny.py", EDGECONV_DATA=str(empty))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "1 passed, 3 skipped" in out, out  # before: the tests read ../shared/data whatever EDGECONV_DATA said
    assert f"real test data missing: {empty / 'mnist'}" in out, out
    assert f"3 skipped because real test data is missing (EDGECONV_DATA={empty}); `make data` fetches it" in out, out


def test_edgeconv_data_is_where_the_fixtures_look(tmp_path):
    data = tmp_path / "elsewhere"
    (data / "mnist").mkdir(parents=True)
    (tmp_path / "test_tiny.py").write_text(TINY)
    r = _pytest(tmp_path, "-q", "-s", "-k", "mnist", "test_tiny.py", EDGECONV_DATA=str(data))
    assert f"MNIST AT {data / 'mnist'}" in r.stdout, r.stdout + r.stderr
    assert "skipped because real test data is missing" not in r.stdout


def test_ci_still_fails_loudly_without_data(tmp_path):
    (tmp_path / "test_tiny.py").write_text(TINY)
    r = _pytest(tmp_path, "-q", "-k", "mnist", "test_tiny.py", EDGECONV_DATA=str(tmp_path / "none"), CI="true")
    assert r.returncode == 1 and "real test data missing" in r.stdout, r.stdout + r.stderr


def test_zoo_hub_preprocessing_skips_without_hymenoptera(tmp_path, monkeypatch):
    """Before: it read hymenoptera with no guard and failed in a fresh clone without ../shared."""
    import pytest

    import conftest
    import test_zoo

    monkeypatch.setattr(test_zoo, "HYMENOPTERA_VAL", tmp_path / "hymenoptera_data" / "val")
    with pytest.raises((pytest.skip.Exception, pytest.fail.Exception), match="real test data missing") as e:
        test_zoo.test_preprocessing_comes_from_the_hubs()
    assert isinstance(e.value, pytest.fail.Exception) == conftest.IN_CI  # skips, or fails under CI


def test_demo_and_benchmarks_read_edgeconv_data(tmp_path, monkeypatch):
    import importlib.util

    from edgeconv import pipeline

    def common_shared() -> Path:  # benchmarks/_common.py as a benchmark script imports it (fresh, not cached)
        spec = importlib.util.spec_from_file_location("_common_under_test", ROOT / "benchmarks" / "_common.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.SHARED

    (tmp_path / "mnist").mkdir()
    monkeypatch.setenv("EDGECONV_DATA", str(tmp_path))
    assert pipeline.default_test_data() == str(tmp_path / "mnist") and common_shared() == tmp_path
    monkeypatch.setenv("EDGECONV_DATA", str(tmp_path / "empty"))
    assert pipeline.default_test_data() is None  # not ../shared/data behind its back
    assert common_shared() == tmp_path / "empty"
