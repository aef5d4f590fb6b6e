"""Artifact store over fsspec: Parquet datasets and checkpoints, manifest last.

A dataset is a folder of Parquet part files plus ``_MANIFEST.json``. Parts are
written first; the manifest (schema kind + version, rows, files with digests,
input URIs and their digests, config digest, code version, timings) is written
last, atomically (rename on local disks, a single PUT on object stores).
Readers only trust the manifest: a folder without one, whatever parts it holds,
does not exist. Part names carry a content digest, so rewriting the same data is
idempotent; parts no longer named by the manifest are removed after it lands.

Any fsspec URL works: a local path (default ``./artifacts``), ``s3://bucket/prefix``
(s3fs; the endpoint comes from ``AWS_ENDPOINT_URL``), ``memory://`` in tests.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import io
import json
import os
import posixpath
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from ipr_core import code_version
from ipr_core.schemas import SchemaError, conform, get_schema

MANIFEST = "_MANIFEST.json"
MANIFEST_FORMAT = 1


class StoreError(RuntimeError):
    """An artifact is missing, incomplete or unreadable; the message names it."""


class ArtifactNotFound(StoreError):
    pass


@dataclass(frozen=True)
class PartInfo:
    path: str  # relative to the dataset folder
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    kind: str
    version: int
    rows: int
    files: tuple[PartInfo, ...]
    digest: str  # content digest: kind, version and every part's sha256
    inputs: Mapping[str, str] = field(default_factory=dict)  # input URI -> its digest
    config_digest: str | None = None
    code_version: str = ""
    created_at: float = 0.0
    # wall_s; for stage outputs also what computing them used (ipr_core.resources):
    # peak_rss_mb, cores, torch_threads, torch_interop_threads, omp_wait_policy
    timings: Mapping[str, Any] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    schema: str = ""
    format: int = MANIFEST_FORMAT
    # Stage identity (ipr_core.pipeline): what the content was computed from.
    identity: str = ""
    recipe: Mapping[str, Any] = field(default_factory=dict)
    origin: str = "computed"  # or "copied from URI" (same identity, another run)

    def to_json(self) -> str:
        d = asdict(self)
        d["files"] = [asdict(f) for f in self.files]
        return json.dumps(d, indent=2, sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str, where: str) -> "Manifest":
        try:
            d = json.loads(text)
            d["files"] = tuple(PartInfo(**f) for f in d["files"])
            return cls(**d)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise StoreError(f"{where}: corrupt manifest ({e})") from None


@dataclass(frozen=True)
class ClientOptions:
    """Bounded waits on object stores (``storage.connect_timeout_s`` ...).

    botocore's defaults (60 s connect and read, retried, and s3fs retrying each
    call 5 more times) turn a stalled endpoint into many minutes of silence. Here
    one call waits at most about ``max_attempts * (connect_timeout_s +
    read_timeout_s)`` plus backoff before it fails; s3fs's own retry loop is cut
    to one try so botocore's ``max_attempts`` is the only retry count."""

    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    max_attempts: int = 3

    def config_kwargs(self) -> dict[str, Any]:
        return {"connect_timeout": self.connect_timeout_s, "read_timeout": self.read_timeout_s, "retries": {"max_attempts": self.max_attempts, "mode": "standard"}}


# The options in force for this call chain: set by a run (its flow, each task) from
# its config; threads the store starts carry them along (contextvars.copy_context).
_CLIENT: contextvars.ContextVar[ClientOptions] = contextvars.ContextVar("ipr_store_client", default=ClientOptions())


@contextlib.contextmanager
def client_options(opts: ClientOptions) -> Iterator[ClientOptions]:
    token = _CLIENT.set(opts)
    try:
        yield opts
    finally:
        _CLIENT.reset(token)


def _fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    if not uri.startswith(("s3://", "s3a://")):
        fs, path = fsspec.core.url_to_fs(uri)
        return fs, path.rstrip("/")
    fs, path = fsspec.core.url_to_fs(uri, config_kwargs=_CLIENT.get().config_kwargs())
    fs.retries = 1  # s3fs's retry loop on top of botocore's; see ClientOptions
    return fs, path.rstrip("/")


def check_root(uri: str, timeout_s: float = 15.0) -> None:
    """A StoreError naming ``storage.root`` unless a run can write under ``uri``:
    local: a directory (or creatable) and writable; s3: credentials present and
    the bucket answering (made if missing) within ``timeout_s``; other fsspec
    URLs: answering within ``timeout_s``. Nothing is written."""
    if "://" not in uri or uri.startswith("file://"):
        p = Path(normalize_uri(uri))
        probe = p
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            raise StoreError(f"storage.root={uri!r} cannot be created: {probe} is a file, not a directory")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise StoreError(f"storage.root={uri!r} is not writable: no write permission on {probe}")
        return
    if uri.startswith(("s3://", "s3a://")):
        import botocore.session

        if botocore.session.get_session().get_credentials() is None:
            raise StoreError(f"storage.root={uri!r}: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile, or an instance role)")
    _probe(uri, timeout_s)


def _probe(uri: str, timeout_s: float) -> None:
    """List the root's bucket (made if missing) on a thread, waiting at most ``timeout_s``."""
    import threading

    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            fs, path = _fs(uri)
            top = path.split("/")[0] if uri.startswith(("s3://", "s3a://")) else path
            if not fs.exists(top) and uri.startswith(("s3://", "s3a://")):
                fs.mkdir(top)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - reported below, with the URI
            outcome.append(e)

    t = threading.Thread(target=contextvars.copy_context().run, args=(probe,), name="ipr-storage-probe", daemon=True)
    t.start()
    t.join(timeout_s)
    if not outcome:
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default endpoint") if uri.startswith(("s3://", "s3a://")) else "its server"
        raise StoreError(f"storage.root={uri!r}: no answer from {endpoint} within {timeout_s:.0f} s (is the endpoint reachable?)")
    if outcome[0] is not None:
        e = outcome[0]
        raise StoreError(f"storage.root={uri!r} is not usable: {type(e).__name__}: {e}")


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


def normalize_uri(uri: str) -> str:
    """Absolute local paths for local URIs; other URLs unchanged (minus trailing /)."""
    if "://" in uri and not uri.startswith("file://"):
        return uri.rstrip("/")
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return str(Path(path).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    """Join path segments onto a URI (works for local paths and URLs)."""
    base = uri.rstrip("/")
    for p in parts:
        base = posixpath.join(base, str(p).strip("/"))
    return base


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    if _is_local(fs):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # atomic on POSIX
    else:
        fs.pipe_file(path, data)  # a single PUT: all or nothing


def read_manifest(uri: str) -> Manifest | None:
    """The dataset's manifest, or None when the dataset is absent/incomplete."""
    fs, path = _fs(uri)
    mpath = posixpath.join(path, MANIFEST)
    try:
        text = fs.cat_file(mpath).decode()
    except FileNotFoundError:
        return None
    return Manifest.from_json(text, join(uri, MANIFEST))


def exists(uri: str) -> bool:
    """True when the dataset/checkpoint at ``uri`` is complete and all its parts exist."""
    m = read_manifest(uri)
    if m is None:
        return False
    fs, path = _fs(uri)
    return all(fs.exists(posixpath.join(path, f.path)) for f in m.files)


def problems(uri: str) -> list[str]:
    """What is wrong with the artifact at ``uri``, re-hashing every file against
    its manifest: [] when it is intact."""
    try:
        m = read_manifest(uri)
    except StoreError as e:
        return [str(e)]
    if m is None:
        return [f"no {MANIFEST}: absent or still being written"]
    fs, path = _fs(uri)
    out = []
    for part in m.files:
        try:
            size, sha = _hash_file(fs, posixpath.join(path, part.path))
        except FileNotFoundError:
            out.append(f"{part.path}: missing")
            continue
        if size != part.bytes or sha != part.sha256:
            out.append(f"{part.path}: content does not match the manifest ({size} bytes, manifest says {part.bytes})")
    return out


def _hash_file(fs: fsspec.AbstractFileSystem, path: str) -> tuple[int, str]:
    """(bytes, sha256) of a file, streamed: a checkpoint's weights never sit in memory whole."""
    h, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


_INTACT: set[tuple[str, str]] = set()  # (uri, content digest) verified in this process


def intact(uri: str) -> bool:
    """``uri`` is complete and every file matches its manifest's sha256; each
    (uri, content digest) is hashed once per process, later calls only check the manifest."""
    try:
        m = read_manifest(uri)
    except StoreError:
        return False
    if m is None:
        return False
    if (uri, m.digest) in _INTACT:
        return True
    if problems(uri):
        return False
    _INTACT.add((uri, m.digest))
    return True


def stale_inputs(uri: str) -> list[str]:
    """Recorded inputs whose current content differs from what the artifact was made from."""
    m = read_manifest(uri)
    out = []
    for u, d in (m.inputs if m else {}).items():
        try:
            now = read_manifest(u)
        except StoreError:
            now = None
        if now is None or now.digest != d:
            out.append(f"input {u}: {'gone' if now is None else 'has new content'}")
    return out


def digest(uri: str) -> str:
    m = read_manifest(uri)
    if m is None:
        raise ArtifactNotFound(f"no complete artifact at {uri} (no {MANIFEST})")
    return m.digest


def _input_digests(inputs: Iterable[str]) -> dict[str, str]:
    out = {}
    for u in inputs:
        m = read_manifest(u)
        if m is None:
            raise ArtifactNotFound(f"input {u} is not a complete artifact (no {MANIFEST})")
        out[u] = m.digest
    return out


@dataclass(frozen=True)
class Stamp:
    """The stage identity a manifest records (see ipr_core.pipeline.stage)."""

    identity: str = ""
    recipe: Mapping[str, Any] = field(default_factory=dict)
    origin: str = "computed"


def _finish(
    fs: fsspec.AbstractFileSystem,
    uri: str,
    path: str,
    kind: str,
    version: int,
    parts: list[PartInfo],
    inputs: Sequence[str],
    config_digest: str | None,
    timings: Mapping[str, float] | None,
    meta: Mapping[str, Any] | None,
    schema_text: str,
    stamp: "Stamp | None" = None,
) -> Manifest:
    content = json.dumps([kind, version, [(p.path, p.sha256) for p in parts]])
    stamp = stamp or Stamp()
    manifest = Manifest(
        kind=kind,
        version=version,
        rows=sum(p.rows for p in parts),
        files=tuple(parts),
        digest=_sha256(content.encode())[:32],
        inputs=_input_digests(inputs),
        config_digest=config_digest,
        code_version=code_version(),
        created_at=time.time(),
        timings=dict(timings or {}),
        meta=dict(meta or {}),
        schema=schema_text,
        identity=stamp.identity,
        recipe=dict(stamp.recipe),
        origin=stamp.origin,
    )
    _write_atomic(fs, posixpath.join(path, MANIFEST), manifest.to_json().encode())
    # Parts from older versions or killed writers are invisible already; tidy them.
    keep = {p.path for p in parts} | {MANIFEST}
    try:
        for f in fs.find(path):
            rel = posixpath.relpath(f, path)
            if rel not in keep and not rel.startswith("."):
                fs.rm_file(f)
    except FileNotFoundError:
        pass
    return manifest


def write_dataset(
    uri: str,
    table: pa.Table,
    kind: str,
    *,
    inputs: Sequence[str] = (),
    config_digest: str | None = None,
    timings: Mapping[str, float] | None = None,
    meta: Mapping[str, Any] | None = None,
    part_rows: int = 50_000,
    stamp: Stamp | None = None,
) -> Manifest:
    """Validate ``table`` as ``kind`` and write it as parts + manifest (last)."""
    spec = get_schema(kind)
    table = conform(table, kind, where=uri)
    fs, path = _fs(uri)
    fs.makedirs(path, exist_ok=True)
    parts: list[PartInfo] = []
    n = table.num_rows
    starts = range(0, max(n, 1), part_rows)
    for i, start in enumerate(starts):
        chunk = table.slice(start, part_rows)
        buf = io.BytesIO()
        pq.write_table(chunk, buf, compression="zstd")
        data = buf.getvalue()
        sha = _sha256(data)
        name = f"part-{i:05d}-{sha[:12]}.parquet"
        fs.pipe_file(posixpath.join(path, name), data)
        parts.append(PartInfo(name, chunk.num_rows, len(data), sha))
    return _finish(fs, uri, path, kind, spec.version, parts, inputs, config_digest, timings, meta, spec.schema.to_string(), stamp)


def read_dataset(uri: str, kind: str | None = None) -> pa.Table:
    """Read a complete dataset, validating manifest, kind, version and schema."""
    m = read_manifest(uri)
    if m is None:
        raise ArtifactNotFound(f"no complete dataset at {uri} (missing {MANIFEST}: absent or still being written)")
    if kind is not None and m.kind != kind:
        raise SchemaError(f"{join(uri, MANIFEST)}: dataset kind is {m.kind!r}, expected {kind!r}")
    spec = get_schema(m.kind)
    if m.version != spec.version:
        raise SchemaError(f"{join(uri, MANIFEST)}: {m.kind} schema version {m.version} is not supported (this code reads version {spec.version})")
    fs, path = _fs(uri)
    tables = []
    for part in m.files:
        ppath = posixpath.join(path, part.path)
        where = join(uri, part.path)
        try:
            data = fs.cat_file(ppath)
        except FileNotFoundError:
            raise ArtifactNotFound(f"{where}: part listed in the manifest is missing") from None
        if _sha256(data) != part.sha256:
            raise StoreError(f"{where}: content does not match the manifest's sha256 (corrupted or overwritten)")
        try:
            # On the calling thread, without Arrow's CPU / IO pools: the parts are
            # small, and a pool still alive at interpreter exit can abort the
            # process ("terminate called without an active exception", SIGABRT).
            t = pq.read_table(io.BytesIO(data), use_threads=False, pre_buffer=False)
        except (pa.ArrowInvalid, OSError) as e:
            raise StoreError(f"{where}: not a readable Parquet file ({e})") from None
        tables.append(conform(t, m.kind, where))
    table = pa.concat_tables(tables) if tables else spec.schema.empty_table()
    if table.num_rows != m.rows:
        raise StoreError(f"{uri}: manifest says {m.rows} rows, parts hold {table.num_rows}")
    return table


def read_rows(uri: str, kind: str | None = None) -> list[dict]:
    return read_dataset(uri, kind).to_pylist()


# --- checkpoints (model folders: safetensors + tokenizer + config) -----------------


def write_checkpoint(
    uri: str,
    local_dir: str | Path,
    *,
    inputs: Sequence[str] = (),
    config_digest: str | None = None,
    timings: Mapping[str, float] | None = None,
    meta: Mapping[str, Any] | None = None,
    stamp: Stamp | None = None,
) -> Manifest:
    """Upload every file of ``local_dir`` to ``uri``, then the manifest.

    The old manifest goes first (from then on the folder is incomplete, never a
    mix that claims to be complete), and each file is written whole (a temporary
    name and an atomic rename locally, one PUT on object stores); reads verify
    every file against the manifest (``read_checkpoint``)."""
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise StoreError(f"checkpoint folder {local_dir} does not exist")
    fs, path = _fs(uri)
    fs.makedirs(path, exist_ok=True)
    try:
        fs.rm_file(posixpath.join(path, MANIFEST))
    except FileNotFoundError:
        pass
    parts = []
    for f in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        rel = f.relative_to(local_dir).as_posix()
        if rel == MANIFEST:
            continue
        data = f.read_bytes()
        target = posixpath.join(path, rel)
        if posixpath.dirname(rel):
            fs.makedirs(posixpath.dirname(target), exist_ok=True)
        if not (_is_local(fs) and Path(target).resolve() == f.resolve()):
            _write_atomic(fs, target, data)
        parts.append(PartInfo(rel, 0, len(data), _sha256(data)))
    if not any(p.path.endswith(".safetensors") for p in parts):
        raise StoreError(f"checkpoint folder {local_dir} holds no .safetensors file")
    return _finish(fs, uri, path, "checkpoint", 1, parts, inputs, config_digest, timings, meta, "", stamp)


def copy_artifact(src: str, dst: str, *, inputs: Sequence[str], stamp: Stamp) -> Manifest:
    """Copy the complete artifact at ``src`` to ``dst`` (parts verified against
    their digests, then a new manifest with the same content digest, last)."""
    m = read_manifest(src)
    if m is None:
        raise ArtifactNotFound(f"no complete artifact at {src}")
    sfs, spath = _fs(src)
    dfs, dpath = _fs(dst)
    dfs.makedirs(dpath, exist_ok=True)
    for part in m.files:
        data = sfs.cat_file(posixpath.join(spath, part.path))
        if _sha256(data) != part.sha256:
            raise StoreError(f"{join(src, part.path)}: content does not match the manifest's sha256 (corrupted or overwritten)")
        target = posixpath.join(dpath, part.path)
        if posixpath.dirname(part.path):
            dfs.makedirs(posixpath.dirname(target), exist_ok=True)
        dfs.pipe_file(target, data)
    return _finish(dfs, dst, dpath, m.kind, m.version, list(m.files), inputs, m.config_digest, m.timings, m.meta, m.schema, stamp)


def cache_dir() -> Path:
    return Path(os.environ.get("IPR_CACHE_DIR", Path.home() / ".cache" / "ipr-flow"))


def read_checkpoint(uri: str) -> Path:
    """A local folder holding the checkpoint at ``uri`` (downloaded once per digest)."""
    m = read_manifest(uri)
    if m is None or m.kind != "checkpoint":
        raise ArtifactNotFound(f"no complete checkpoint at {uri}")
    fs, path = _fs(uri)
    if _is_local(fs):
        if not intact(uri):  # verified once per digest per process
            raise StoreError(f"checkpoint {uri} is damaged: {'; '.join(problems(uri))}")
        return Path(path)
    local = cache_dir() / "checkpoints" / m.digest
    done = local / MANIFEST
    if not done.exists():
        tmp = local.with_name(local.name + f".tmp-{uuid.uuid4().hex[:8]}")
        for part in m.files:
            data = fs.cat_file(posixpath.join(path, part.path))
            if _sha256(data) != part.sha256:
                raise StoreError(f"{join(uri, part.path)}: checksum mismatch")
            (tmp / part.path).parent.mkdir(parents=True, exist_ok=True)
            (tmp / part.path).write_bytes(data)
        (tmp / MANIFEST).write_text(m.to_json())
        try:
            os.replace(tmp, local)
        except OSError:  # another process won the race
            pass
    return local


# --- small JSON / binary blobs (reports, plots) --------------------------------------


def write_bytes(uri: str, data: bytes) -> str:
    fs, path = _fs(uri)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    _write_atomic(fs, path, data)
    return uri


def read_bytes(uri: str) -> bytes:
    fs, path = _fs(uri)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise ArtifactNotFound(f"{uri} does not exist") from None


# --- listing --------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    uri: str
    kind: str | None
    rows: int | None
    complete: bool
    created_at: float | None
    problem: str | None = None  # e.g. a corrupt manifest


def ls(uri: str) -> list[DatasetInfo]:
    """Every dataset/checkpoint below ``uri``: complete (manifest) or incomplete (parts only)."""
    fs, path = _fs(uri)
    if not fs.exists(path):
        raise ArtifactNotFound(f"{uri} does not exist")
    proto = uri.split("://", 1)[0] + "://" if "://" in uri and not uri.startswith("file://") else ""
    folders: dict[str, bool] = {}
    for f in fs.find(path):
        d, name = posixpath.split(f)
        if name == MANIFEST:
            folders[d] = True
        elif name.endswith((".parquet", ".safetensors")):
            folders.setdefault(d, False)
    out = []
    # A checkpoint's sub-files (e.g. nested folders) are not separate datasets.
    complete_roots = [d for d, ok in folders.items() if ok]
    for d in sorted(folders):
        if not folders[d] and any(d.startswith(r + "/") for r in complete_roots):
            continue
        u = proto + d if proto else d
        try:
            m = read_manifest(u) if folders[d] else None
        except StoreError as e:  # one corrupt manifest does not hide the rest
            out.append(DatasetInfo(u, None, None, False, None, str(e)))
            continue
        out.append(DatasetInfo(u, m.kind if m else None, m.rows if m else None, m is not None, m.created_at if m else None))
    return out
