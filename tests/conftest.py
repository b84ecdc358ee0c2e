"""Shared fixtures: the real datasets ($EDGECONV_DATA, default ../shared/data beside the repo; `make data` fetches
them) and small real subsets; the suite's process hygiene: every process a test starts must be gone when the session ends (checked, named, killed)."""
from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the one folder of real datasets (mnist/, cats_and_dogs_small/, hymenoptera_data/): `make data` fills it
SHARED = Path(os.environ.get("EDGECONV_DATA") or ROOT.parent / "shared" / "data").expanduser().absolute()
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
MISSING = "real test data missing"  # every data skip starts with it: the summary counts them


def require(path: Path) -> Path:
    """Real data the test needs: fail loudly under CI, skip on a developer machine without it."""
    if not path.exists():
        msg = f"{MISSING}: {path} (`make data` fetches it into $EDGECONV_DATA, default ../shared/data)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def mnist_test_dir() -> Path:
    return require(SHARED / "mnist")


@pytest.fixture(scope="session")
def catsdogs_dir() -> Path:
    return require(SHARED / "cats_and_dogs_small")


@pytest.fixture(scope="session")
def hymenoptera_dir() -> Path:
    return require(SHARED / "hymenoptera_data")


@pytest.fixture(scope="session")
def catsdogs_tiny(tmp_path_factory, catsdogs_dir) -> Path:
    """A small real subset of cats_and_dogs_small in Chollet's layout (train/validation/test)."""
    root = tmp_path_factory.mktemp("catsdogs_tiny")
    per_split = {"train": 40, "validation": 16, "test": 16}
    for split, n in per_split.items():
        for cls in ("cats", "dogs"):
            src = sorted((catsdogs_dir / split / cls).iterdir())[:n]
            dst = root / split / cls
            dst.mkdir(parents=True)
            for f in src:
                shutil.copy(f, dst / f.name)
    return root


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line above pytest's own: how many of the skips are data-bound tests without their data."""
    def reason(report) -> str:
        lr = report.longrepr
        text = lr[2] if isinstance(lr, tuple) and len(lr) == 3 else str(lr)
        return text[len("Skipped: "):] if text.startswith("Skipped: ") else text

    n = sum(reason(r).startswith(MISSING) for r in terminalreporter.stats.get("skipped", []))
    if n:
        terminalreporter.write_line(f"{n} skipped because real test data is missing (EDGECONV_DATA={SHARED}); "
                                    f"`make data` fetches it", yellow=True, bold=True)


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly, with a reason, where CUDA finds no GPU for this process (gpu_info(), which honours
    CUDA_VISIBLE_DEVICES and works on a Jetson, where there is no /dev/nvidia0)."""
    if not any("gpu" in item.keywords for item in items):
        return
    from edgeconv_runtime.gpu import gpu_info

    if gpu_info() is not None:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (CUDA/TensorRT); CUDA finds none for this process")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ------------------------------------------------------------------------------------------ shared fixtures' budget
# pytest-timeout's per-test limit (`timeout`) runs from a test's setup to its teardown, so a module- or session-scoped
# fixture (a trained run, an exported bundle, a server) was charged to whichever test asked for it first: on a loaded
# machine `mnist_run` alone passed 600 s and 125 tests errored. Such a fixture is built on its own clock instead: the
# test's clock is paused while it builds (and resumes with what was left), and the build has its own, generous budget,
# `build_timeout` in pyproject.toml. A build that passes it fails once; pytest hands that failure to every user.
def pytest_addoption(parser):
    parser.addini("build_timeout", "seconds a module- or session-scoped fixture may take to set up, on its own clock "
                  "(the per-test timeout does not count it); 0: no limit", default="3600")


class _BuildTimeout:
    """SIGALRM-based: pauses pytest-timeout's signal timer (timeout_method = "signal") and arms the build's own."""

    def __init__(self, name: str, budget: float):
        self.name, self.budget = name, budget

    def _expired(self, signum, frame):
        pytest.fail(f"shared fixture {self.name!r} took more than {self.budget:g} s to build (build_timeout in "
                    f"pyproject.toml; no test's own timeout was charged for it)", pytrace=False)

    def __enter__(self):
        self.handler = signal.getsignal(signal.SIGALRM)
        self.left, _ = signal.setitimer(signal.ITIMER_REAL, 0)  # the running test's remaining time, paused
        if self.budget > 0:
            signal.signal(signal.SIGALRM, self._expired)
            signal.setitimer(signal.ITIMER_REAL, self.budget)
        return self

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.handler)
        if self.left > 0:
            signal.setitimer(signal.ITIMER_REAL, self.left)  # the test's clock resumes where it stopped
        return False


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    """Module-/session-scoped fixtures set up under build_timeout, off the requesting test's clock (the fixtures
    they depend on are set up before this hook, each under its own budget)."""
    if fixturedef.scope == "function" or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return
    with _BuildTimeout(fixturedef.argname, float(request.config.getini("build_timeout") or 0)):
        yield


# `make mutants` runs the same tests once per mutant: with EDGECONV_TEST_FIXTURES set, the trained runs and bundles
# below are built once into that folder (by the unmutated code) and reused by every later session.
FIXTURES = os.environ.get("EDGECONV_TEST_FIXTURES")


def _built(tmp_path_factory, kind: str, name: str, build) -> Path:
    """``build(out)`` into a fresh temp folder, or once into $EDGECONV_TEST_FIXTURES/kind/name and reused."""
    if not FIXTURES:
        out = tmp_path_factory.mktemp(kind) / name
        build(out)
        return out
    out, done = Path(FIXTURES) / kind / name, Path(FIXTURES) / kind / f"{name}.complete"
    if not done.exists():
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        build(out)
        done.touch()
    return out


@pytest.fixture(scope="session")
def mnist_run(tmp_path_factory, mnist_test_dir) -> Path:
    """A real chollet_mnist run: 2 epochs on mnist-5k, tested on the official t10k digits."""
    from edgeconv.training import TrainConfig, train

    return _built(tmp_path_factory, "runs", "mnist", lambda out: train(TrainConfig(
        data="mnist-5k", test_data=str(mnist_test_dir), model="chollet_mnist", out=str(out), epochs=2, optimizer="adam", lr=2e-3,
        progress=False)))


@pytest.fixture(scope="session")
def mnist_bundle(tmp_path_factory, mnist_run) -> Path:
    """That run exported with FP32, FP16 and INT8 (calibrated on its real training digits)."""
    from edgeconv.exporting import ExportRequest, export_run

    return _built(tmp_path_factory, "bundles", "mnist", lambda out: export_run(ExportRequest(
        checkpoint=str(mnist_run), out=str(out), precisions=("fp32", "fp16", "int8"), calib_size=200)))


@pytest.fixture(scope="session")
def rgb_bundle(tmp_path_factory, catsdogs_tiny) -> Path:
    """A small RGB model (chollet_catsdogs at 64x64) trained 1 epoch on real cats/dogs, exported FP32."""
    from edgeconv.exporting import ExportRequest, export_run
    from edgeconv.training import TrainConfig, train

    def build(out: Path) -> None:
        run = tmp_path_factory.mktemp("runs") / "catsdogs"
        train(TrainConfig(data=str(catsdogs_tiny), model="chollet_catsdogs", out=str(run), epochs=1, size=64, progress=False))
        export_run(ExportRequest(checkpoint=str(run), out=str(out)))

    return _built(tmp_path_factory, "bundles", "catsdogs", build)


@pytest.fixture(scope="session")
def lite0_int8_bundle(tmp_path_factory, catsdogs_tiny) -> Path:
    """efficientnet_lite0, one epoch of fast feature extraction on real cats and dogs, exported FP32 + INT8 (cached like the
    others, so the same bundle can be run again under an emulated CPU: qemu-x86_64-static -cpu Haswell-v4)."""
    from edgeconv.exporting import ExportRequest, export_run
    from edgeconv.training import TrainConfig, train

    def build(out: Path) -> None:
        run = tmp_path_factory.mktemp("runs") / "lite0"
        train(TrainConfig(data=str(catsdogs_tiny), model="efficientnet_lite0", strategy="feature-extract", epochs=1, out=str(run),
                          progress=False))
        export_run(ExportRequest(checkpoint=str(run), out=str(out), precisions=("fp32", "int8"), calib_size=64))

    return _built(tmp_path_factory, "bundles", "lite0_int8", build)


# ------------------------------------------------------------------------------------------ leaked processes
# The suite's process becomes a child subreaper (Linux): a grandchild orphaned by its parent (a server whose
# launcher died, a worker of a killed torchrun) is re-parented here instead of to init, so it is seen too.
_PR_SET_CHILD_SUBREAPER = 36
_first_seen: dict = {}  # child pid -> the test that had just run when it was first seen alive


def _children() -> dict:
    """pid -> (state, command line) of every child of this process ("Z": exited, not yet collected)."""
    me, out = os.getpid(), {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            if int(ppid) == me:
                out[int(entry.name)] = (state, (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip())
        except (OSError, ValueError):  # gone meanwhile
            continue
    return out


def _alive() -> dict:
    return {pid: cmd for pid, (state, cmd) in _children().items() if state != "Z"}


def pytest_configure(config):
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        except (OSError, AttributeError):
            pass


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """Remember which test was running when each child process first appeared (named if it leaks)."""
    if not Path("/proc/self/stat").exists():
        return
    for pid in _alive():
        _first_seen.setdefault(pid, item.nodeid)


def _reap_zombies() -> None:
    """Collect orphans re-parented here that have exited (subprocess reaps only the children it started)."""
    for pid, (state, _) in _children().items():
        if state == "Z":
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def pytest_sessionfinish(session, exitstatus):
    """Fail the run, naming each one, if a process a test started is still alive; then kill it."""
    if not Path("/proc/self/stat").exists():
        return
    deadline = time.time() + 10  # a server told to stop may still be finishing its requests
    leaked = _alive()
    while leaked and time.time() < deadline:
        time.sleep(0.2)
        leaked = _alive()
    _reap_zombies()
    if not leaked:
        return
    lines = []
    for pid, cmd in leaked.items():
        lines.append(f"  pid {pid}: {cmd[:300]}  (first seen after {_first_seen.get(pid, 'the last test')})")
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (OSError, ChildProcessError):
            pass
    msg = "processes started by the tests are still alive at the end of the session (killed now):\n" + "\n".join(lines)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("")
        reporter.write_sep("=", "LEAKED PROCESSES", red=True, bold=True)
        reporter.write_line(msg)
    else:
        print(msg, file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
