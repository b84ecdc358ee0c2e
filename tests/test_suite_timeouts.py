"""The suite on a busy machine (issue 24 §5): a shared fixture (module or session scope: a trained run, an exported
bundle, a server) is built under its own budget, ``build_timeout``, and is never charged to the test that happens to
ask for it first; each test keeps the per-test ``timeout`` for itself. Each case runs pytest in a subprocess on a tiny
test file with this suite's conftest loaded as a plugin and small limits."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent

SLOW_SHARED = r'''
import time
import pytest

@pytest.fixture(scope="session")
def slow_build():
    with open("builds.log", "a") as f:
        f.write("built\n")
    time.sleep({build_s})  # a trained run on a loaded machine: longer than the per-test limit
    return "artifact"

def test_first_user(slow_build):
    assert slow_build == "artifact"

def test_second_user(slow_build):
    assert slow_build == "artifact"

def test_own_work_still_limited(slow_build):
    time.sleep({own_s})  # the test's own work: the per-test limit still applies, counted after the build
'''


def _pytest(tmp_path: Path, source: str, timeout: float, build_timeout: float) -> tuple:
    (tmp_path / "test_tiny.py").write_text(source)
    (tmp_path / "pytest.ini").write_text(f"[pytest]\ntimeout = {timeout}\ntimeout_method = signal\nbuild_timeout = {build_timeout}\n")
    start = time.monotonic()
    # no plugin autoloading (pytest starts in a quarter of the time on a loaded machine): pytest-timeout by name
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "pytest_timeout", "-p", "conftest", "-q", "-rA", "-p", "no:cacheprovider",
                        "test_tiny.py"], cwd=tmp_path, capture_output=True,
                       env={**__import__("os").environ, "PYTHONPATH": str(TESTS), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
                       text=True, timeout=540)  # pytest's own start is slow on a loaded machine (36 s seen at load 19)
    return r, time.monotonic() - start


def test_a_shared_fixture_build_is_not_charged_to_the_first_test(tmp_path):
    # margins for a loaded machine: the build and the test's own work each take 1.5x the per-test limit
    r, _ = _pytest(tmp_path, SLOW_SHARED.format(build_s=15, own_s=15), timeout=10, build_timeout=300)
    out = r.stdout + r.stderr
    # before the fix: test_first_user errored with "Timeout (>10.0s) from pytest-timeout" in the fixture's setup
    assert "PASSED test_tiny.py::test_first_user" in out, out
    assert "PASSED test_tiny.py::test_second_user" in out, out
    # the per-test limit is kept for the test's own work (15 s > 10 s)
    assert "FAILED test_tiny.py::test_own_work_still_limited" in out and "Timeout (>10.0s) from pytest-timeout" in out, out
    assert "1 failed, 2 passed" in out, out


def test_a_shared_fixture_has_its_own_budget_and_fails_once(tmp_path):
    r, _ = _pytest(tmp_path, SLOW_SHARED.format(build_s=300, own_s=0), timeout=600, build_timeout=3)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "shared fixture 'slow_build' took more than 3 s to build (build_timeout" in out, out
    assert "3 errors" in out, out  # every user errors with the same cached failure ...
    assert (tmp_path / "builds.log").read_text() == "built\n"  # ... built (and waited for) once


def test_the_ini_documents_both_limits():
    text = (TESTS.parent / "pyproject.toml").read_text()
    ini = text.split("[tool.pytest.ini_options]", 1)[1].split("\n[", 1)[0]
    assert "\ntimeout = 600" in ini and "\nbuild_timeout = " in ini and '\ntimeout_method = "signal"' in ini
    assert "fixtures included" not in ini  # the old, wrong comment
