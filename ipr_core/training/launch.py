"""One training call on several processes of this machine (``training.processes``).

``run_processes(fn, n, *args, **kwargs)`` runs ``fn(*args, **kwargs)`` (a
trainer: ``train_sft``, ``train_ipr``) under ``torch.distributed.run`` with
``n`` processes and returns rank 0's result, as if ``fn`` had been called
here. The trainers are already DDP code (``Runtime``: accelerate's
``Accelerator`` reads torchrun's environment; one process is world size 1), so
the launcher only moves the call and its result across the process boundary:
the call is pickled to a file, each rank unpickles and runs it, rank 0 pickles
the result back. On a GPU node each rank takes ``cuda:LOCAL_RANK`` of the GPUs
the process was given (Ray sets ``CUDA_VISIBLE_DEVICES`` for a task); on CPU
the ranks talk over gloo.

The processes are the launcher's process group: an exception in rank 0 is
raised again in the caller (the same type a one-process call raises), any
other failure ends the call with ``TrainingProcessesError`` and the tail of
the ranks' output, and an error in the caller (a Prefect cancel, Ctrl-C) kills
the group, so no rank outlives its stage. Torch's threads are split between
the ranks.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, TypeVar

_T = TypeVar("_T")

RESULT = "result.pkl"


class TrainingProcessesError(RuntimeError):
    """A rank of a multi-process training call failed."""


def _qualname(fn: Callable) -> str:
    """``module:name`` of a module-level function, importable by every rank."""
    if "<" in fn.__qualname__ or fn.__module__ == "__main__":
        raise ValueError(f"{fn!r} must be a module-level function of an importable module to run in several processes")
    return f"{fn.__module__}:{fn.__qualname__}"


def _child_env(n: int) -> dict[str, str]:
    """This process's environment, with this package importable and torch's
    threads shared among ``n`` ranks."""
    import torch

    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH", "")
    threads = max(1, torch.get_num_threads() // n)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, path) if p), "OMP_NUM_THREADS": str(threads)}


def command(n: int, job: Path) -> list[str]:
    """torchrun on this node: ``--standalone`` picks a free rendezvous port itself."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", "ipr_core.training.launch", str(job)]


def run_processes(fn: Callable[..., _T], n: int, *args: Any, **kwargs: Any) -> _T:
    """``fn(*args, **kwargs)`` on ``n`` processes; rank 0's return value. ``n=1`` calls it here."""
    if n == 1:
        return fn(*args, **kwargs)
    with tempfile.TemporaryDirectory(prefix="ipr-train-") as tmp:
        job = Path(tmp) / "job.pkl"
        job.write_bytes(pickle.dumps((_qualname(fn), args, kwargs)))
        log_path = Path(tmp) / "ranks.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(command(n, job), stdout=out, stderr=subprocess.STDOUT, env=_child_env(n), start_new_session=True)
            try:
                rc = proc.wait()
            except BaseException:
                os.killpg(proc.pid, signal.SIGKILL)  # torchrun and every rank
                proc.wait()
                raise
        done = Path(tmp) / RESULT
        if not done.exists():
            tail = log_path.read_text(errors="replace")[-4000:]
            raise TrainingProcessesError(f"training on {n} processes failed (exit status {rc}); the ranks' last output:\n{tail}")
        ok, value = pickle.loads(done.read_bytes())
        if not ok:
            raise value  # rank 0's own exception (e.g. TrainingError), as a one-process call raises it
        return value


def _main(job: Path) -> int:
    """One rank: run the pickled call; rank 0 writes its outcome (the result, or
    the exception it raised) beside the job."""
    import importlib

    name, args, kwargs = pickle.loads(job.read_bytes())
    module, _, attr = name.partition(":")
    try:
        outcome = (True, getattr(importlib.import_module(module), attr)(*args, **kwargs))
    except Exception as e:  # rank 0 hands it to the caller; every rank exits non-zero
        outcome = (False, e)
    if os.environ.get("RANK", "0") == "0":
        tmp = job.with_name(RESULT + ".tmp")
        tmp.write_bytes(pickle.dumps(outcome))
        tmp.replace(job.with_name(RESULT))  # whole or absent
    if not outcome[0]:
        raise outcome[1]
    return 0


if __name__ == "__main__":
    sys.exit(_main(Path(sys.argv[1])))
