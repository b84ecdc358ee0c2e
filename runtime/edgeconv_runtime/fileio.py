"""Atomic writes and hashing: a crash or a full disk never leaves a half-written file."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import EdgeconvError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def open_regular(path: str | os.PathLike, follow_symlinks: bool = True) -> int:
    """A read-only descriptor of ``path``, refused (OSError) unless it is a regular file.

    Opened with O_NONBLOCK, so a FIFO or a device put where a file should be never blocks the reader;
    ``follow_symlinks=False`` refuses a symlink itself (O_NOFOLLOW).
    """
    import errno
    import stat

    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 17) -> str:
    """sha256 of a regular file; a FIFO, device or directory is an OSError, never a read that blocks.

    Read into one reused buffer that stays in the CPU cache (no new 1 MB bytes object, and its page faults, per
    block): a quarter less CPU than ``read(1 MB)`` for the 36 MB of an efficientnet_lite0 bundle; hashlib
    releases the GIL while it hashes, so other threads run meanwhile.
    """
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with os.fdopen(open_regular(path), "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, then rename over ``path``.

    ``mode`` (e.g. 0o600 for a private key) is set before any byte is written; default: 0666 less the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, (0o666 & ~_umask()) if mode is None else mode)  # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise EdgeconvError(f"could not write {path}: {exc.strerror or exc}; free some disk space or choose another --out") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# Test hook: called with the name of each step of the final swap ("swap", "swapped", "removed-old", and in the
# fallback "moved-old", "moved-new"); a crash test sets it to kill the process at one step. None in normal use.
_swap_hook = None

RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100
_RENAMEAT2_SYSCALL = {"x86_64": 316, "amd64": 316, "aarch64": 276, "arm64": 276}  # asm/unistd.h of each architecture
STALE_SECONDS = 10 * 60  # a leftover whose owner cannot be told is removed once it is this old


def _step(name: str) -> None:
    if _swap_hook is not None:
        _swap_hook(name)


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE).

    Returns False, having changed nothing, where the kernel, libc or file system cannot do it
    (not Linux, Linux < 3.15, some network file systems); other failures raise OSError.
    """
    import ctypes
    import platform
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    a_b, b_b = os.fsencode(os.fspath(a)), os.fsencode(os.fspath(b))
    fn = getattr(libc, "renameat2", None)  # glibc >= 2.28
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        rc = fn(_AT_FDCWD, a_b, _AT_FDCWD, b_b, RENAME_EXCHANGE)
    else:  # older glibc (JetPack 4's 2.27): the raw system call
        number = _RENAMEAT2_SYSCALL.get(platform.machine().lower())
        if number is None:
            return False
        libc.syscall.restype = ctypes.c_long
        rc = libc.syscall(ctypes.c_long(number), ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(a_b), ctypes.c_int(_AT_FDCWD),
                          ctypes.c_char_p(b_b), ctypes.c_uint(RENAME_EXCHANGE))
    if rc == 0:
        return True
    err = ctypes.get_errno()
    import errno

    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
        return False
    raise OSError(err, os.strerror(err), os.fspath(a))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def remove_stale_temp_dirs(final: str | os.PathLike, now: float | None = None) -> list:
    """Remove the ``.NAME.PID-*.tmp`` / ``.NAME.old-PID`` folders that killed exports of ``final`` left behind.

    A folder is stale when the process named in it is gone, or (a name without a PID, written by an older
    edgeconv, or a PID the system may have reused) when it is older than STALE_SECONDS. Returns what was removed.
    """
    import re
    import time

    final = Path(final)
    parent = final.parent
    if not parent.is_dir():
        return []
    now = time.time() if now is None else now
    name = re.escape(final.name)
    tmp_re = re.compile(rf"^\.{name}\.(?:(\d+)-)?[^/]*\.tmp$")
    old_re = re.compile(rf"^\.{name}\.old-(\d+)$")
    removed = []
    for entry in parent.iterdir():
        m = tmp_re.match(entry.name) or old_re.match(entry.name)
        if not m or entry.is_symlink() or not entry.is_dir():
            continue
        pid = int(m.group(1)) if m.group(1) else None
        try:
            age = now - entry.stat().st_mtime
        except OSError:
            continue
        if pid == os.getpid():
            continue  # ours, in use
        alive = pid is not None and _pid_alive(pid)
        if (pid is not None and not alive) or age > (STALE_SECONDS if pid is None else 24 * 3600):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside ``final``; on success it replaces ``final`` whole.

    An existing ``final`` is refused unless ``force``; with ``force`` the complete new directory and the
    old one trade places in one atomic rename (RENAME_EXCHANGE), so at every instant ``final`` holds the
    complete old directory or the complete new one, even under kill -9 or power loss. Leftovers of killed
    earlier runs are removed first.
    """
    final = Path(final)
    if final.exists() and not force:
        raise EdgeconvError(f"{final} already exists; pass --force to replace it or choose another --out")
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}-", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        _step("swap")
        if final.exists() or final.is_symlink():
            if exchange_paths(tmp, final):
                # ``final`` is the new directory, ``tmp`` now holds the old one
                _fsync_dir(final.parent)
                _step("swapped")
                shutil.rmtree(tmp, ignore_errors=True)
                _step("removed-old")
            else:
                # no RENAME_EXCHANGE here (non-Linux, old kernel, a file system without it): two renames, with a
                # moment between them when ``final`` is absent; a kill there leaves the old bundle in .NAME.old-PID
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                os.replace(final, old)
                _step("moved-old")
                try:
                    os.replace(tmp, final)
                except OSError:
                    os.replace(old, final)  # put the old one back
                    raise
                _step("moved-new")
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            _step("swapped")
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EdgeconvError(f"could not write {final}: {exc.strerror or exc}; free some disk space or choose another --out") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
