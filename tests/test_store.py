import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import pair_row
from ipr_core import store
from ipr_core.schemas import SchemaError, from_rows

ROOT = Path(__file__).resolve().parents[1]


def _pairs(n):
    return from_rows([pair_row(i, "step" if i % 2 else "outcome") for i in range(n)], "pairs")


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "artifacts")
    return request.getfixturevalue("s3_root")


def test_write_read_manifest(root):
    uri = store.join(root, "run", "iter-01", "pairs")
    m = store.write_dataset(uri, _pairs(7), "pairs", part_rows=3, config_digest="abc", timings={"build_s": 0.1})
    assert m.rows == 7 and len(m.files) == 3 and m.kind == "pairs" and m.version == 1
    assert store.exists(uri)
    t = store.read_dataset(uri, "pairs")
    assert t.num_rows == 7 and t.column("pair_id").to_pylist() == [f"p{i}" for i in range(7)]
    man = json.loads(store.read_bytes(store.join(uri, store.MANIFEST)))
    assert {"schema", "version", "rows", "files", "inputs", "config_digest", "code_version", "timings"} <= set(man)


def test_inputs_recorded_with_digests(root):
    a = store.join(root, "a")
    ma = store.write_dataset(a, _pairs(2), "pairs")
    b = store.join(root, "b")
    mb = store.write_dataset(b, _pairs(1), "pairs", inputs=[a])
    assert mb.inputs == {a: ma.digest}
    with pytest.raises(store.ArtifactNotFound, match="input .* is not a complete artifact"):
        store.write_dataset(store.join(root, "c"), _pairs(1), "pairs", inputs=[store.join(root, "missing")])


def test_rewrite_is_idempotent_and_cleans_old_parts(root):
    uri = store.join(root, "ds")
    m1 = store.write_dataset(uri, _pairs(4), "pairs", part_rows=2)
    m2 = store.write_dataset(uri, _pairs(4), "pairs", part_rows=2)
    assert m1.digest == m2.digest and [f.path for f in m1.files] == [f.path for f in m2.files]
    m3 = store.write_dataset(uri, _pairs(3), "pairs", part_rows=10)
    assert m3.digest != m1.digest
    infos = store.ls(root)
    assert [(i.kind, i.rows, i.complete) for i in infos] == [("pairs", 3, True)]
    fs, path = store._fs(uri)
    assert sorted(os.path.basename(f) for f in fs.find(path)) == sorted([store.MANIFEST] + [f.path for f in m3.files])


def test_empty_dataset(root):
    uri = store.join(root, "empty")
    store.write_dataset(uri, _pairs(0), "pairs")
    assert store.read_dataset(uri).num_rows == 0


def test_nothing_written_on_schema_error(root):
    uri = store.join(root, "bad")
    with pytest.raises(SchemaError, match="missing column"):
        store.write_dataset(uri, _pairs(2).drop_columns(["kind"]), "pairs")
    fs, path = store._fs(uri)
    assert not fs.exists(path) or not fs.find(path)
    assert not store.exists(uri)


def test_missing_uri_is_named(root):
    uri = store.join(root, "nope")
    with pytest.raises(store.ArtifactNotFound, match="nope"):
        store.read_dataset(uri)
    assert store.read_manifest(uri) is None


def _rewrite_part(uri, data: bytes, fix_sha=True):
    m = store.read_manifest(uri)
    part = store.join(uri, m.files[0].path)
    store.write_bytes(part, data)
    if fix_sha:
        man = json.loads(store.read_bytes(store.join(uri, store.MANIFEST)))
        man["files"][0]["sha256"] = store._sha256(data)
        store.write_bytes(store.join(uri, store.MANIFEST), json.dumps(man).encode())
    return part


def test_corrupted_parquet_is_named(root):
    uri = store.join(root, "corrupt")
    store.write_dataset(uri, _pairs(3), "pairs")
    part = _rewrite_part(uri, b"PAR1 this is not parquet", fix_sha=False)
    with pytest.raises(store.StoreError, match=r"part-00000.*sha256"):
        store.read_dataset(uri)
    _rewrite_part(uri, b"PAR1 this is not parquet", fix_sha=True)
    with pytest.raises(store.StoreError, match=rf"{os.path.basename(part)}: not a readable Parquet"):
        store.read_dataset(uri)


def test_missing_column_in_stored_part_is_named(root):
    import io

    uri = store.join(root, "missingcol")
    store.write_dataset(uri, _pairs(3), "pairs")
    buf = io.BytesIO()
    pq.write_table(_pairs(3).drop_columns(["rejected"]), buf)
    _rewrite_part(uri, buf.getvalue())
    with pytest.raises(SchemaError, match=r"part-00000.*missing column\(s\) \['rejected'\]"):
        store.read_dataset(uri)


def test_wrong_schema_version_and_kind(root):
    uri = store.join(root, "ver")
    store.write_dataset(uri, _pairs(1), "pairs")
    with pytest.raises(SchemaError, match="dataset kind is 'pairs', expected 'eval'"):
        store.read_dataset(uri, "eval")
    man = json.loads(store.read_bytes(store.join(uri, store.MANIFEST)))
    man["version"] = 99
    store.write_bytes(store.join(uri, store.MANIFEST), json.dumps(man).encode())
    with pytest.raises(SchemaError, match="_MANIFEST.json: pairs schema version 99 is not supported"):
        store.read_dataset(uri)
    store.write_bytes(store.join(uri, store.MANIFEST), b"{not json")
    with pytest.raises(store.StoreError, match="corrupt manifest"):
        store.read_dataset(uri)


KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from ipr_core import store
    from ipr_core.schemas import from_rows
    sys.path.insert(0, "tests")
    from helpers import pair_row
    real_finish = store._finish
    def slow_finish(*a, **k):
        print("PARTS-WRITTEN", flush=True)
        time.sleep(60)  # killed here: parts exist, manifest does not
        return real_finish(*a, **k)
    store._finish = slow_finish
    store.write_dataset(sys.argv[1], from_rows([pair_row(i) for i in range(int(sys.argv[2]))], "pairs"), "pairs", part_rows=2)
    """
)


def _kill_mid_write(uri: str, n: int) -> None:
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, uri, str(n)], cwd=ROOT, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    line = proc.stdout.readline()
    assert line.strip() == "PARTS-WRITTEN"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def test_killed_writer_leaves_no_visible_dataset(root):
    uri = store.join(root, "killed")
    _kill_mid_write(uri, 5)
    fs, path = store._fs(uri)
    assert [f for f in fs.find(path) if f.endswith(".parquet")], "parts should exist"
    assert not store.exists(uri)
    with pytest.raises(store.ArtifactNotFound):
        store.read_dataset(uri)
    assert [(i.complete, i.rows) for i in store.ls(root)] == [(False, None)]
    # a killed rewrite leaves the previous complete version readable
    store.write_dataset(uri, _pairs(3), "pairs")
    _kill_mid_write(uri, 6)
    assert store.read_dataset(uri).num_rows == 3


def test_checkpoint_round_trip(root, tmp_path, monkeypatch):
    monkeypatch.setenv("IPR_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    (src / "model.safetensors").write_bytes(b"\x00" * 64)
    (src / "config.json").write_text("{}")
    (src / "sub" / "tok.json").write_text("[]")
    uri = store.join(root, "run", "sft", "model")
    m = store.write_checkpoint(uri, src)
    assert m.kind == "checkpoint" and {f.path for f in m.files} == {"model.safetensors", "config.json", "sub/tok.json"}
    local = store.read_checkpoint(uri)
    assert (local / "sub" / "tok.json").read_text() == "[]" and (local / "model.safetensors").stat().st_size == 64
    assert [i.kind for i in store.ls(root)] == ["checkpoint"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(store.StoreError, match="no .safetensors"):
        store.write_checkpoint(store.join(root, "bad"), empty)


def test_pairs_load_with_datasets_in_trl_format(tmp_path):
    from datasets import load_dataset

    uri = str(tmp_path / "pairs")
    m = store.write_dataset(uri, _pairs(4), "pairs", part_rows=2)
    ds = load_dataset("parquet", data_files=[os.path.join(uri, f.path) for f in m.files], split="train")
    assert ds.num_rows == 4
    row = ds[0]
    assert row["prompt"][0] == {"role": "system", "content": "sys"}
    assert row["chosen"][0]["role"] == "assistant" and row["rejected"][0]["role"] == "assistant"
    from trl.data_utils import is_conversational

    assert is_conversational(row)
