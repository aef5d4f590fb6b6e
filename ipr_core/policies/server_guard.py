"""Run a model server that does not outlive the process that started it.

    python .../ipr_core/policies/server_guard.py PARENT_PID -- CMD ...

``serving`` starts every managed server through this guard (by file path,
with the project's Python: it imports nothing of the project), in a process
group of its own. The guard runs CMD, and when PARENT_PID is gone (the
pipeline's process was SIGKILLed, or crashed before its exit hooks ran) it
stops the group: SIGTERM, then SIGKILL. Stopping the server from the parent
kills the group, guard included. The guard exits with CMD's status (a CMD
killed by signal N: 128 + N).

A guard rather than Linux's PR_SET_PDEATHSIG: that fires when the *thread*
that started the child ends, and Prefect runs a stage on a thread that ends
with the stage, while a server is reused by the stages after it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def _parent_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return os.getppid() == pid  # re-parented: the pid may have been reused


def main(argv: list[str]) -> int:
    parent, sep, cmd = int(argv[0]), argv[1], argv[2:]
    if sep != "--" or not cmd:
        print("usage: server_guard PARENT_PID -- CMD ...", file=sys.stderr)
        return 2
    child = subprocess.Popen(cmd)
    while child.poll() is None:
        if not _parent_alive(parent):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group's SIGTERM is for the server and its workers
            os.killpg(os.getpgrp(), signal.SIGTERM)
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            os.killpg(os.getpgrp(), signal.SIGKILL)  # whatever is left, this guard included
        time.sleep(1.0)
    rc = child.returncode
    return 128 - rc if rc < 0 else rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
