"""fsspec at the edges: URIs in, plain bytes and pyarrow tables out.

Local paths stay plain paths (absolute, so Ray workers with another cwd see the same file);
anything with a protocol (memory://, s3://, gs://, ...) goes through fsspec.
"""

from __future__ import annotations

import io
import os
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def resolve_uri(uri: str) -> str:
    if is_remote(uri):
        return uri
    return os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts]) if is_remote(base) else os.path.join(base, *parts)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Make `uri` appear whole or not at all.

    Local and other rename-capable filesystems: write a temporary sibling, then rename over.
    Object stores (no rename): a single PUT is already atomic, the object appears whole.
    """
    fs, path = filesystem(uri)
    parent = os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if is_remote(uri) and not uri.startswith("memory://"):
        fs.pipe_file(path, data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    if is_remote(uri):
        fs.mv(tmp, path)
    else:
        os.replace(tmp, path)


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def list_parquet(uri: str) -> list[str]:
    """A Parquet file, or the sorted *.parquet files of a directory, as full URIs."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    if fs.isfile(path):
        return [uri]
    files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet"))
    return [fs.unstrip_protocol(p) for p in files] if is_remote(uri) else files


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def file_size(uri: str) -> int:
    fs, path = filesystem(uri)
    return int(fs.size(path))
