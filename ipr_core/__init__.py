"""ipr_core: the IPR algorithm, data contracts, environments and model backends.

Pure Python + torch; never imports prefect (an architecture test enforces it).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

__version__ = "0.1.0"


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
