"""What a stage used is recorded with it: its peak resident memory and thread settings."""

from __future__ import annotations

import mmap
import time

import pytest
import torch

from helpers import TINY_RUN
from ipr_core import store
from ipr_core.config import load_config
from ipr_core.pipeline import run_local, run_plan, run_uri
from ipr_core.pipeline.summary import result_rows
from ipr_core.resources import MALLOC_THRESHOLD, PeakRSS, rss_bytes, thread_settings


def test_the_peak_sees_memory_held_only_inside_the_block():
    if rss_bytes() is None:
        pytest.skip("no /proc/self/statm: the peak falls back to the lifetime maximum")
    before = rss_bytes() / 2**20
    with PeakRSS(interval_s=0.01) as p:
        # An anonymous mapping gets fresh pages whatever the heap holds: a
        # bytearray could be served from memory an earlier test freed but
        # glibc kept resident, and then no resident memory would be added.
        block = mmap.mmap(-1, 300 * 2**20)
        block.write(b"x" * len(block))  # touched, so resident
        time.sleep(0.3)  # the sampler thread runs while the block waits (the write above holds the GIL)
        block.close()
    assert p.peak_mb >= before + 250, (before, p.peak_mb)
    assert rss_bytes() / 2**20 < p.peak_mb - 200  # it was freed: a sample, not the lifetime maximum


def test_stage_manifests_record_peak_memory_and_threads_and_the_table_shows_it(tmp_path):
    pytest.importorskip("minigrid")
    cfg = load_config(None, [*TINY_RUN, f"storage.root={tmp_path}", "run_name=r"])
    run_local(cfg, until="eval/test/sft")
    run = run_uri(cfg)
    m = store.read_manifest(store.join(run, "sft/model"))
    t = m.timings
    assert t["peak_rss_mb"] > 50 and t["torch_threads"] == torch.get_num_threads() and t["cores"] >= 1, t
    assert t == {**t, **{k: v for k, v in thread_settings().items()}}
    [sft] = [r for r in result_rows(run, run_plan(cfg, run)) if r["model"] == "sft"]
    evals = [store.read_manifest(store.join(run, f"eval/{split}/sft")) for split in ("test", "val")]
    assert sft["peak_rss_mb"] == max(t["peak_rss_mb"], *(e.timings["peak_rss_mb"] for e in evals if e is not None))


def test_pipeline_torch_threads_is_what_the_stages_run_with(tmp_path):
    pytest.importorskip("minigrid")
    before = torch.get_num_threads()
    cfg = load_config(None, [*TINY_RUN, f"storage.root={tmp_path}", "run_name=r", "pipeline.torch_threads=1"])
    try:
        run_local(cfg, until="sft/model")
    finally:
        torch.set_num_threads(before)
    m = store.read_manifest(store.join(run_uri(cfg), "sft/model"))
    assert m.timings["torch_threads"] == 1, m.timings


def test_openmp_spins_briefly_by_default_and_the_users_value_wins():
    import os
    import subprocess
    import sys

    code = "import os, ipr_core; print(os.environ['GOMP_SPINCOUNT'])"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip() == "10000"
    mine = subprocess.run([sys.executable, "-c", code], env={**env, "GOMP_SPINCOUNT": "5"}, capture_output=True, text=True, check=True)
    assert mine.stdout.strip() == "5"


def test_auto_torch_threads_share_the_cores_among_concurrent_stages(monkeypatch):
    import ipr_core.resources as res

    monkeypatch.setattr(res, "cores", lambda: 8)
    assert res.stage_threads("auto", max_workers=2, local=True) == 4
    assert res.stage_threads("auto", max_workers=16, local=True) == 1
    assert res.stage_threads("auto", max_workers=4, local=False) == 8  # an external cluster's worker: its own cores
    assert res.stage_threads(3, max_workers=2, local=True) == 3
    assert res.stage_threads(None, max_workers=2, local=True) is None
    assert load_config(None, []).pipeline.torch_threads == "auto"


_FRAGMENT = """
import os, sys
if sys.argv[1] == "ipr":
    import ipr_core  # noqa: F401
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
b = bytearray(16 << 20); del b  # glibc's default: freeing a mapped 16 MB block raises its threshold to 16 MB
blocks = [bytearray(16 << 20) for _ in range(20)]  # above ipr_core's fixed threshold (8 MB)
before = rss()
del blocks[::2]  # every other block: holes in the heap that trimming the top cannot return
print(os.environ.get("MALLOC_MMAP_THRESHOLD_", ""), (before - rss()) >> 20)
"""


def test_freed_memory_leaves_the_resident_set_and_the_users_malloc_settings_win():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}

    def run(mode, **extra):
        out = subprocess.run([sys.executable, "-c", _FRAGMENT, mode], env={**env, **extra}, capture_output=True, text=True, check=True).stdout.split()
        return out[0] if len(out) == 2 else "", int(out[-1])

    threshold, returned = run("ipr")
    assert threshold == str(MALLOC_THRESHOLD) and returned >= 140, returned  # ~160 MB of freed blocks left the process
    assert run("plain")[1] < 20  # without it, glibc keeps them resident
    assert run("ipr", MALLOC_MMAP_THRESHOLD_="999999")[0] == "999999"  # the user's value is left alone


def test_process_wide_makes_once_per_key_and_a_slow_make_holds_up_only_its_own_key():
    import threading
    import uuid

    from ipr_core.resources import process_wide

    slow, fast, inner = (("test-pw", uuid.uuid4().hex, name) for name in ("slow", "fast", "inner"))
    started, release, made = threading.Event(), threading.Event(), []

    def make_slow():
        made.append("slow")
        started.set()
        release.wait(10)
        return process_wide(inner, lambda: "inner")  # a make may ask for another key (it deadlocked under one global lock)

    # daemon threads: a deadlock fails the asserts below instead of hanging the suite
    results, other = [], []
    threads = [threading.Thread(target=lambda: results.append(process_wide(slow, make_slow)), daemon=True) for _ in range(3)]
    threads[0].start()
    assert started.wait(10)
    for t in threads[1:]:
        t.start()
    lookup = threading.Thread(target=lambda: other.append(process_wide(fast, lambda: "fast")), daemon=True)
    lookup.start()
    lookup.join(5)
    assert other == ["fast"]  # not held up by the slow key's make
    release.set()
    for t in threads:
        t.join(10)
    assert results == ["inner"] * 3 and made == ["slow"]
