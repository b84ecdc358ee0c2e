"""Ctrl-C in the hardest case: a child that inherited SIGINT as ignored (a background job, nohup, a suite started
from one) must install its own handler; the child is killed whatever happens before the caller gets control back."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

# SIG_IGN survives exec; a launcher rather than preexec_fn, which is unsafe in a process with threads
LAUNCHER = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); os.execv(sys.argv[1], sys.argv[1:])"


def interrupt_when(cmd: list, ready: Callable[[str], bool], errfile: Path, wait_s: float = 120, not_ready: str = "not ready") -> tuple:
    """Start ``cmd`` with SIGINT ignored, send SIGINT once ``ready(stderr so far)`` holds, wait for it to exit;
    (return code, stderr). Fails (with the child's stderr or ``not_ready``) when it exits or ``wait_s`` passes first."""
    with open(errfile, "w+") as errf:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, *cmd], stdout=subprocess.DEVNULL, stderr=errf)
        try:
            deadline = time.time() + wait_s
            while not ready(errfile.read_text()) and time.time() < deadline and proc.poll() is None:
                time.sleep(0.1)
            assert ready(errfile.read_text()), errfile.read_text() if proc.poll() is not None else f"{not_ready} in {wait_s} s"
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return proc.returncode, errfile.read_text()
