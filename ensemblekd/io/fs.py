"""fsspec at the edges: URIs in, plain bytes and pyarrow tables out.

Local paths stay plain paths (absolute, so Ray workers with another cwd see the same file);
anything with a protocol (memory://, s3://, gs://, ...) goes through fsspec.

Object stores get their options (endpoint, credentials) from `store.storage_options` through
fsspec's per-protocol config (`configure_for`, run in every process that touches the store), or
from the usual environment variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fnmatch
import io
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import fsspec.config
import pyarrow as pa
import pyarrow.parquet as pq

from ensemblekd.errors import UserError

# What fsspec read from its config files and FSSPEC_* variables; configure() starts from it.
_BASE_CONF = copy.deepcopy(fsspec.config.conf)


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def is_object_store(uri: str) -> bool:
    """s3://, gs://, ...: no directories, no rename, but a single PUT appears whole."""
    return is_remote(uri) and not uri.startswith("memory://")


def configure(protocol: str, options: dict[str, Any]) -> None:
    """Every fsspec filesystem of `protocol` made in this process from now on gets `options`
    (fsspec applies its config when it makes a filesystem and caches filesystems by it)."""
    fsspec.config.conf[protocol] = {**_BASE_CONF.get(protocol, {}), **options}


def configure_for(cfg) -> None:
    """store.storage_options for the store's protocol. Run it in every process that touches the
    store: the driver (load_config), the label actors and the Ray Train workers."""
    if is_remote(cfg.store.uri):
        configure(fsspec.core.split_protocol(cfg.store.uri)[0], cfg.store.storage_options)


def check_reachable(uri: str, key: str) -> None:
    """An object-store URI: its endpoint answers, the credentials work and its bucket exists;
    otherwise a one-line UserError naming `key`. Anything else: nothing to check."""
    if not is_object_store(uri):
        return
    fs, path = filesystem(uri)
    bucket = path.split("/", 1)[0]
    try:
        if fs.exists(path) or fs.exists(bucket):  # a key's exists raises when the store is unusable
            return
    except Exception as exc:  # noqa: BLE001 (botocore, aiohttp, PermissionError: whatever the backend raises)
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{key}: cannot use the object store for '{uri}' ({why}); check the endpoint and "
                        "credentials: store.storage_options (endpoint_url, ...) or AWS_ENDPOINT_URL, "
                        "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY") from None
    raise UserError(f"{key}: bucket '{bucket}' of '{uri}' does not exist; create it or fix {key}")


def resolve_uri(uri: str) -> str:
    if is_remote(uri):
        return uri
    return os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri)
    if is_remote(uri):
        # fsspec caches listings (and the sizes and ETags in them) per process; another process
        # (a label actor, the driver saving the manifest) may have written here since.
        fs.invalidate_cache(path)
    return fs, path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts]) if is_remote(base) else os.path.join(base, *parts)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    """The whole object in one read (on object stores one GET: a consistent copy even while
    another process replaces it)."""
    fs, path = filesystem(uri)
    return fs.cat_file(path)


TEMPORARY = ".tmp-"  # NAME.tmp-XXXXXXXX: a write in progress (or one a crash cut short)
FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


@contextlib.contextmanager
def writing(uri: str) -> Iterator[None]:
    """A full disk or a read-only place is bad input, not a crash: a one-line UserError naming the
    file; what was written before is untouched."""
    try:
        yield
    except OSError as exc:
        if exc.errno in FULL:
            raise UserError(f"{uri}: cannot write, {os.strerror(exc.errno).lower()}; free space there or use another "
                            "location (what is already committed is kept: re-run to resume)") from None
        if exc.errno in READ_ONLY:
            raise UserError(f"{uri}: cannot write, {os.strerror(exc.errno).lower()}; use a writable location "
                            "(store.uri, trainer.output_dir)") from None
        raise


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Make `uri` appear whole or not at all.

    Local and other rename-capable filesystems: write a temporary sibling, then rename over; the
    temporary file is removed if the write fails (a killed process leaves it: remove_temporaries).
    Object stores (no rename): a single PUT is already atomic, the object appears whole; no
    "directories" are made first (s3fs would create a missing bucket, silently, for a typo).
    """
    fs, path = filesystem(uri)
    if is_object_store(uri):
        fs.pipe_file(path, data)
        return
    tmp = f"{path}{TEMPORARY}{uuid.uuid4().hex[:8]}"
    with writing(uri):
        try:
            parent = os.path.dirname(path)
            if parent:
                fs.makedirs(parent, exist_ok=True)
            with fs.open(tmp, "wb") as f:
                f.write(data)
            if is_remote(uri):
                fs.mv(tmp, path)
            else:
                os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                fs.rm_file(tmp)
            raise


def write_dir_atomic(uri: str, write: Callable[[str], None], last: tuple[str, ...] = ()) -> None:
    """Make the directory `uri` hold exactly what `write(local_dir)` puts in a fresh local directory,
    and never a part of it under its own name.

    Local: written in a temporary sibling (NAME.tmp-XXXXXXXX), then renamed into place; an earlier
    directory is renamed aside first and removed last (put back if the rename fails). A failed
    write removes the temporary directory and leaves the earlier one as it was. Remote (no
    directory rename): written locally, the earlier objects removed, then uploaded one file at a
    time (each object appears whole), the files named in `last` (what marks the directory as
    complete, e.g. config.json) after the others: an upload cut short leaves no such file.
    """
    import shutil
    import tempfile

    fs, path = filesystem(uri)
    if is_remote(uri):
        with tempfile.TemporaryDirectory() as tmp:
            write(tmp)
            names = sorted(os.listdir(tmp), key=lambda name: (name in last, name))
            with writing(uri):
                if fs.exists(path):
                    fs.rm(path, recursive=True)
                for name in names:
                    fs.put(os.path.join(tmp, name), f"{path.rstrip('/')}/{name}", recursive=True)
        return
    parent, tag = os.path.dirname(path), uuid.uuid4().hex[:8]
    tmp, aside = f"{path}{TEMPORARY}{tag}", f"{path}.old-{tag}"
    with writing(uri):
        try:
            if parent:
                os.makedirs(parent, exist_ok=True)
            os.mkdir(tmp)
            write(tmp)
            moved = os.path.isdir(path)
            if moved:
                os.rename(path, aside)
            try:
                os.rename(tmp, path)
            except BaseException:
                if moved:
                    os.rename(aside, path)
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    shutil.rmtree(aside, ignore_errors=True)


def remove_temporaries(dir_uri: str, patterns: tuple[str, ...]) -> int:
    """Delete the temporary files of writes that a killed process cut short (NAME.tmp-XXXXXXXX,
    NAME matching one of `patterns`) under a local directory; object stores never have any. Only
    for a caller that is the one writer there (the label lock). Returns how many went."""
    if is_remote(dir_uri) or not os.path.isdir(dir_uri):
        return 0
    removed = 0
    for root, _, files in os.walk(dir_uri):
        for name in files:
            if any(fnmatch.fnmatch(name, f"{p}{TEMPORARY}*") for p in patterns):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(root, name))
                    removed += 1
    return removed


def create_exclusive(uri: str, data: bytes) -> bool:
    """Create `uri` with `data` only if it does not exist; False if it already does.

    Local: write a temporary file, then hard-link it into place (link fails if the target
    exists), so the file appears whole. Object stores: a conditional PUT (If-None-Match: *)
    through fsspec's pipe_file(mode="create"), which S3 and its compatible servers honour.
    """
    fs, path = filesystem(uri)
    parent = os.path.dirname(path)
    try:
        if parent and not is_object_store(uri):
            with writing(uri):
                fs.makedirs(parent, exist_ok=True)
        if is_remote(uri):
            fs.pipe_file(path, data, mode="create")
        else:
            tmp = f"{path}{TEMPORARY}{uuid.uuid4().hex[:8]}"
            try:
                with writing(uri), open(tmp, "wb") as f:
                    f.write(data)
                os.link(tmp, path)
            finally:
                with contextlib.suppress(OSError):  # gone already, or never made (a read-only place)
                    os.remove(tmp)
    except FileExistsError:
        return False
    return True


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def remove_all(uris: list[str]) -> None:
    """Delete files, in batches where the filesystem has them (S3: 1,000 keys a request)."""
    if not uris:
        return
    fs, _ = filesystem(uris[0])
    fs.rm([filesystem(u)[1] for u in uris])


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
    """A Parquet file as a table: local files through pyarrow's own reader (about 30% faster
    than through a Python file object), anything else through fsspec."""
    if not is_remote(uri):
        return pq.read_table(uri, columns=columns)
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def file_size(uri: str) -> int:
    fs, path = filesystem(uri)
    return int(fs.size(path))


def file_sizes(dir_uri: str) -> dict[str, int]:
    """{file name: bytes} of a directory's files, in one listing (one request on object stores)."""
    fs, path = filesystem(dir_uri)
    try:
        entries = fs.ls(path, detail=True, refresh=True) if is_remote(dir_uri) else fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    return {os.path.basename(e["name"].rstrip("/")): int(e["size"]) for e in entries if e.get("type") == "file"}
