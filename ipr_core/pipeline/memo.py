"""Where the step-reward memo lives, and how it grows while MC runs.

The memo of one scope (scorer digest + rollout settings, ``ipr_core.mc_memo``)
is a folder of small ``mc_memo`` datasets under the storage root,
``{root}/_memo/mc/{scope}/``: every MC stage (expert MC, agent MC of every
iteration, of every run under the root) reads the complete ones when it
starts and adds a part every ``mc.memo_flush`` finished estimates, each
written like any artifact (Parquet parts, manifest last). A stage killed
midway keeps the parts it finished; a part without its manifest is ignored.
Part names are unique per writer, so concurrent shards and runs never write
the same folder.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Mapping

from ipr_core import mc_memo, store
from ipr_core.pipeline.runner import publish
from ipr_core.pipeline.stage import Rows

log = logging.getLogger(__name__)

MEMO = "_memo"


def folder(root: str, scope: mc_memo.Scope) -> str:
    return store.join(root, MEMO, "mc", scope.digest[:16])


def read(root: str, scope: mc_memo.Scope) -> list[dict]:
    """Every row of the scope's complete memo parts (a damaged part is skipped)."""
    try:
        infos = store.ls(folder(root, scope))
    except store.ArtifactNotFound:
        return []
    rows: list[dict] = []
    for info in infos:
        if not info.complete:
            continue
        try:
            rows.extend(store.read_rows(info.uri, "mc_memo"))
        except store.StoreError as e:
            log.warning("step-reward memo part %s is unreadable (%s): its estimates are recomputed", info.uri, e)
    return rows


class Writer:
    """Collects finished rollouts; writes a part each time ``flush`` estimates
    (all N rollouts of a key) are complete; ``write`` writes what is left."""

    def __init__(self, root: str, scope: mc_memo.Scope, n_rollouts: int, flush: int, label: str):
        self.folder, self.n, self.flush_every = folder(root, scope), n_rollouts, flush
        self.name = f"{re.sub(r'[^A-Za-z0-9-]+', '_', label)}-{uuid.uuid4().hex[:8]}"
        self.open: dict[str, list[Mapping]] = {}  # key -> its finished rollouts so far
        self.done: list[Mapping] = []
        self.parts = 0

    def add(self, row: Mapping) -> None:
        got = self.open.setdefault(row["key"], [])
        got.append(row)
        if len(got) == self.n:
            self.done.extend(self.open.pop(row["key"]))
            if len(self.done) >= self.flush_every * self.n:
                self.write()

    def write(self) -> None:
        if not self.done:
            return
        uri = store.join(self.folder, f"{self.name}-{self.parts:05d}")
        publish(uri, "mc_memo", Rows(self.done, {"estimates": len(self.done) // self.n}))
        self.parts += 1
        self.done = []
