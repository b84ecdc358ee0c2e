"""Export --force: a kill at any step of the final swap leaves --out with the complete old or the complete new bundle."""
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from edgeconv_runtime import EdgeconvError, Model, fileio
from edgeconv_runtime.fileio import atomic_directory, exchange_paths
from bundle_helpers import edit_manifest

# the child writes a real bundle through atomic_directory (what export_bundle does) and dies at one step
CHILD = textwrap.dedent("""
    import os, shutil, sys
    from edgeconv_runtime import fileio
    src, out, kill_at = sys.argv[1], sys.argv[2], sys.argv[3]
    def hook(step):
        if step == kill_at:
            os._exit(9)
    fileio._swap_hook = hook
    with fileio.atomic_directory(out, force=True) as tmp:
        for name in os.listdir(src):
            s = os.path.join(src, name)
            (shutil.copytree if os.path.isdir(s) else shutil.copyfile)(s, os.path.join(tmp, name))
        if kill_at == "writing":
            os._exit(9)
""")


def named_copy(src: Path, dst: Path, name: str) -> Path:
    shutil.copytree(src, dst)
    edit_manifest(dst, lambda m: m.update(name=name))
    return dst


def leftovers(out: Path) -> list:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def loaded_name(out: Path) -> str:
    m = Model.load(out, backend="onnxruntime-cpu")
    try:
        assert m.verify()["ok"]
        return m.bundle.name
    finally:
        m.close()


@pytest.mark.parametrize("kill_at, survivor", [
    ("writing", "old"),  # killed while the new bundle was being written
    ("swap", "old"),  # the new bundle complete, just before the exchange
    ("swapped", "new"),  # just after it: the old bundle sits in the temp folder
    ("removed-old", "new"),
])
def test_a_kill_at_each_swap_step_leaves_a_complete_bundle(mnist_bundle, tmp_path, kill_at, survivor):
    old = named_copy(mnist_bundle, tmp_path / "old-src", "old")
    new = named_copy(mnist_bundle, tmp_path / "new-src", "new")
    out = tmp_path / "work" / "bundle"
    out.parent.mkdir()
    shutil.copytree(old, out)
    r = subprocess.run([sys.executable, "-c", CHILD, str(new), str(out), kill_at], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 9, r.stderr
    assert loaded_name(out) == survivor
    if kill_at in ("writing", "swap", "swapped"):
        assert leftovers(out), "the kill should have left a temp folder behind"
    # the next export of the same --out removes what the killed one left (its PID is gone)
    r = subprocess.run([sys.executable, "-c", CHILD, str(new), str(out), "never"], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert loaded_name(out) == "new"
    assert leftovers(out) == []


def test_stale_folders_are_removed_only_when_their_owner_is_gone_or_they_are_old(tmp_path):
    out = tmp_path / "bundle"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            f".bundle.{dead.pid}-ab_c1.tmp": False,  # its export was killed: removed
            f".bundle.old-{dead.pid}": False,
            f".bundle.{live.pid}-xyz.tmp": True,  # an export still running: kept
            ".bundle.legacy1.tmp": True,  # no PID, written a minute ago: kept
            ".bundle.legacy2.tmp": False,  # no PID, older than STALE_SECONDS: removed
            ".other.123-x.tmp": True,  # another --out's folder: not ours to touch
        }
        for n in names:
            (tmp_path / n).mkdir()
            (tmp_path / n / "model.onnx").write_bytes(b"x")
        past = time.time() - fileio.STALE_SECONDS - 60
        os.utime(tmp_path / ".bundle.legacy2.tmp", (past, past))
        with atomic_directory(out) as tmp:
            (tmp / "f").write_text("new")
        assert (out / "f").read_text() == "new"
        assert {n: (tmp_path / n).exists() for n in names} == names
    finally:
        live.kill()
        live.wait()


def test_exchange_swaps_two_directories(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "y").write_text("b")
    if sys.platform.startswith("linux"):
        assert exchange_paths(a, b)
        assert (a / "y").exists() and (b / "x").exists()
    with pytest.raises(OSError):
        exchange_paths(a, tmp_path / "missing")


def test_without_rename_exchange_the_two_rename_fallback_still_replaces(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "exchange_paths", lambda a, b: False)
    steps = []
    monkeypatch.setattr(fileio, "_swap_hook", steps.append)
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "old").write_text("old")
    with atomic_directory(out, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(os.listdir(out)) == ["new"] and leftovers(out) == []
    assert steps == ["swap", "moved-old", "moved-new"]
    with pytest.raises(EdgeconvError, match="already exists; pass --force"):
        with atomic_directory(out):
            pass


def test_a_failed_export_keeps_the_old_bundle_and_leaves_nothing(tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(out, force=True) as tmp:
            (tmp / "new").write_text("new")
            raise RuntimeError("parity gate failed")
    assert os.listdir(out) == ["old"] and leftovers(out) == []


def test_a_real_export_killed_after_the_exchange_leaves_the_new_bundle(mnist_run, mnist_bundle, tmp_path):
    """`edgeconv export --force` itself, killed between the exchange and removing the old bundle."""
    out = named_copy(mnist_bundle, tmp_path / "bundle", "old")
    code = ("import os, sys\nfrom edgeconv_runtime import fileio\n"
            "fileio._swap_hook = lambda step: step == 'swapped' and os._exit(9)\n"
            "from edgeconv.cli import main\nsys.argv = ['edgeconv'] + sys.argv[1:]\nmain()\n")
    r = subprocess.run([sys.executable, "-c", code, "export", str(mnist_run), "--out", str(out), "--force"],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 9, r.stderr[-2000:]
    assert loaded_name(out) != "old" and leftovers(out)  # the new bundle is in place; the old one waits in a temp folder
    r = subprocess.run([sys.executable, "-m", "edgeconv", "export", str(mnist_run), "--out", str(out), "--force"],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert loaded_name(out) != "old" and leftovers(out) == []
