"""ipr_core: the IPR algorithm, data contracts, environments and model backends.

Pure Python + torch; never imports prefect (an architecture test enforces it).
"""

from __future__ import annotations

import hashlib
import os
import sys
from functools import lru_cache
from pathlib import Path

__version__ = "0.1.0"

# GNU OpenMP (torch's CPU threads) spin-waits ~300k iterations between parallel
# regions. Runs sharing a host then spin against each other: three demo-sized
# runs on 2 cores were 13x slower each; with a 10k spin, 4x, and a run alone
# as fast as before (docs/performance.md). libgomp reads it when it loads, so
# it is set here, before torch is imported; the user's own value wins.
if "torch" not in sys.modules:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

# Freed tensors go back to the OS instead of staying resident as glibc heap
# (ipr_core/resources.py; the user's MALLOC_* environment wins).
from ipr_core.resources import return_freed_memory  # noqa: E402

return_freed_memory()


@lru_cache(maxsize=1)
def code_version() -> str:
    """Package version plus a digest of ipr_core's source files.

    Part of every cache key and manifest: changing the algorithm's code
    invalidates cached stage results, editing docs or tests does not.
    """
    h = hashlib.sha256()
    root = Path(__file__).parent
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return f"{__version__}+{h.hexdigest()[:10]}"
