"""Where runs live: local folders and object stores behind one small set of calls.

Every file of a run is listed, read and published through this module, so the run format
(:mod:`rldiag.runformat`), the recorder's writer and the reader behave the same on a local disk, a shared
filesystem and object storage. A location is either a :class:`pathlib.Path` (local) or a
:class:`RemotePath` (``s3://``, ``gs://``, ``az://``/``abfs://``, ``hdfs://`` ... through fsspec).

Why fsspec for URIs (and not ``pyarrow.fs``): its ``pipe()`` publishes a file with one whole-object PUT and
its exclusive-create mode (``"xb"``, S3's ``If-None-Match: *``) creates the manifest once without a lock;
pyarrow's S3 writer always uploads in parts (which the S3 server of the tests does not complete) and has no
conditional write. Reading Parquet through fsspec file objects works with pyarrow as it is. Each protocol
needs its fsspec package (``s3fs`` for ``s3://``: ``pip install rldiag[s3]``; ``gcsfs``, ``adlfs``).
Credentials and endpoints come from where the backend looks (for S3: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_PROFILE``...), or from ``storage_options``.

Local reads are defensive: only regular files are opened (``O_NOFOLLOW``: a symbolic link planted in a run
folder is skipped, never followed out of it), opened non-blocking so a FIFO cannot hang a reader, and
small files (manifests, writer files) are read with a bound.

>>> location("runs/exp1")
PosixPath('runs/exp1')
>>> is_uri("s3://bucket/runs/exp1"), is_uri("runs/exp1"), is_uri("file:///tmp/x")
(True, False, True)
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
import stat as stat_mod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, BinaryIO, Final, TypeGuard, Union

__all__ = [
    "Entry",
    "Location",
    "RemotePath",
    "is_remote",
    "is_uri",
    "list_files",
    "list_folders",
    "location",
    "open_binary",
    "parquet_source",
    "read_limited",
    "write_once",
    "write_whole",
]

_URI_RE: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_PACKAGES: Final = {
    "s3": "s3fs (pip install rldiag[s3])",
    "s3a": "s3fs (pip install rldiag[s3])",
    "gs": "gcsfs (pip install rldiag[gcs])",
    "gcs": "gcsfs (pip install rldiag[gcs])",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
    "hdfs": "pyarrow with libhdfs",
}


def is_uri(text: Any) -> bool:
    """Whether ``text`` is a string with a scheme (``s3://...``, ``file://...``)."""
    return isinstance(text, str) and _URI_RE.match(text) is not None


class RemotePath:
    """A file or folder on an fsspec filesystem, with the few :class:`pathlib.Path` methods rldiag uses.

    ``str()`` gives the URI. Folders are prefixes: ``mkdir`` does nothing and a folder exists once a file
    is under it.
    """

    __slots__ = ("fs", "key", "protocol")

    def __init__(self, fs: Any, key: str, protocol: str) -> None:
        self.fs = fs
        self.key = key.rstrip("/")
        self.protocol = protocol

    # -- names -----------------------------------------------------------------------------------------
    def __truediv__(self, other: str) -> RemotePath:
        return RemotePath(self.fs, f"{self.key}/{str(other).strip('/')}", self.protocol)

    def __str__(self) -> str:
        return f"{self.protocol}://{self.key}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __lt__(self, other: RemotePath) -> bool:
        return str(self) < str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def stem(self) -> str:
        n = self.name
        return n.rsplit(".", 1)[0] if "." in n[1:] else n

    @property
    def suffix(self) -> str:
        n = self.name
        return "." + n.rsplit(".", 1)[1] if "." in n[1:] else ""

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.fs, self.key.rsplit("/", 1)[0] if "/" in self.key else self.key, self.protocol)

    @property
    def parents(self) -> tuple[RemotePath, ...]:
        """The enclosing folders, nearest first, up to the bucket."""
        parts = self.key.split("/")
        return tuple(RemotePath(self.fs, "/".join(parts[:i]), self.protocol) for i in range(len(parts) - 1, 0, -1))

    def with_name(self, name: str) -> RemotePath:
        return self.parent / name

    def resolve(self) -> RemotePath:
        return self

    # -- queries ---------------------------------------------------------------------------------------
    def stat(self) -> SimpleNamespace:
        """``st_size``, ``st_mtime`` and ``st_mtime_ns`` of a file (one metadata request)."""
        info = self.fs.info(self.key)
        if info.get("type") != "file":
            raise IsADirectoryError(errno.EISDIR, "a folder, not a file", str(self))
        mtime = _mtime(info)
        return SimpleNamespace(st_size=int(info.get("size") or 0), st_mtime=mtime, st_mtime_ns=int(mtime * 1e9))

    def exists(self) -> bool:
        return bool(self.fs.exists(self.key))

    def is_file(self) -> bool:
        return bool(self.fs.isfile(self.key))

    def is_dir(self) -> bool:
        return bool(self.fs.isdir(self.key))

    def iterdir(self) -> Iterator[RemotePath]:
        try:
            names = self.fs.ls(self.key, detail=False)
        except FileNotFoundError:
            return iter(())
        return iter(RemotePath(self.fs, n, self.protocol) for n in names if n.rstrip("/") != self.key)

    def glob(self, pattern: str) -> list[RemotePath]:
        """Files directly in this folder whose name matches ``pattern`` (no ``**``)."""
        return [self / e.name for e in list_files(self) if fnmatch.fnmatchcase(e.name, pattern)]

    # -- reading and writing ---------------------------------------------------------------------------
    def open(self, mode: str = "rb") -> Any:
        return self.fs.open(self.key, mode)

    def read_bytes(self) -> bytes:
        return bytes(self.fs.cat_file(self.key))

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        write_whole(self, data)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        return None  # object stores have prefixes, not folders

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise


Location = Union[Path, RemotePath]  # noqa: UP007 - a runtime alias
"""A run folder or file: a local path or a remote one."""


def _mtime(info: Mapping[str, Any]) -> float:
    for key in ("LastModified", "mtime", "updated", "last_modified", "modified", "created"):
        v = info.get(key)
        if v is None:
            continue
        if hasattr(v, "timestamp"):
            return float(v.timestamp())
        if isinstance(v, (int, float)):
            return float(v)
        try:
            import datetime as dt

            return dt.datetime.fromisoformat(str(v)).timestamp()
        except ValueError:
            continue
    return 0.0


_FILESYSTEMS: dict[tuple[str, str], Any] = {}


def _filesystem(protocol: str, storage_options: Mapping[str, Any] | None) -> Any:
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec comes with the s3/gcs extras
        need = _PACKAGES.get(protocol, "its fsspec backend")
        raise ImportError(f"{protocol}:// runs need fsspec and {need}") from None
    opts = dict(storage_options or {})
    # a live run grows: every listing must ask the store, not fsspec's cache of an earlier one
    opts.setdefault("use_listings_cache", False)
    key = (protocol, repr(sorted(opts.items())))
    if key not in _FILESYSTEMS:
        try:
            fs = fsspec.filesystem(protocol, **opts)
        except (ImportError, ValueError) as exc:
            need = _PACKAGES.get(protocol, f"an fsspec backend for {protocol}://")
            raise ImportError(f"{protocol}:// runs need {need}: {exc}") from None
        _FILESYSTEMS[key] = fs
    return _FILESYSTEMS[key]


def location(path: str | os.PathLike[str] | RemotePath, storage_options: Mapping[str, Any] | None = None) -> Location:
    """A local :class:`~pathlib.Path` or a :class:`RemotePath` for a path or URI (``file://`` is local).

    ``storage_options`` go to the fsspec filesystem (for S3 e.g. ``{"endpoint_url": ..., "key": ...}``);
    without them the backend's usual configuration is used (environment variables, profiles).
    """
    if isinstance(path, RemotePath):
        return path
    if isinstance(path, Path):
        return path
    text = os.fspath(path)
    m = _URI_RE.match(text)
    if m is None:
        return Path(text)
    protocol = m.group(1).lower()
    rest = text[m.end() :]
    if protocol == "file":
        return Path(rest if rest.startswith("/") else "/" + rest)
    fs = _filesystem(protocol, storage_options)
    key = fs._strip_protocol(text) if hasattr(fs, "_strip_protocol") else rest
    if not key or key.strip("/") == "":
        raise ValueError(f"{text}: give a bucket and a folder (e.g. s3://bucket/runs/exp1)")
    return RemotePath(fs, str(key), protocol)


_BACKEND_MODULES: Final[tuple[str, ...]] = ("botocore", "aiobotocore", "s3fs", "google.auth", "gcsfs", "azure", "adlfs")
"""Packages whose errors are an object store's (an fsspec backend's), not rldiag's."""

_BACKEND_HINTS: Final[dict[str, str]] = {
    "NoCredentialsError": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)",
    "PartialCredentialsError": "set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)",
    "EndpointConnectionError": "check AWS_ENDPOINT_URL (for a store other than AWS) and that it is reachable from here",
    "ConnectTimeoutError": "check AWS_ENDPOINT_URL (for a store other than AWS) and that it is reachable from here",
    "DefaultCredentialsError": "set GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default login`",
    "ClientAuthenticationError": "check the storage account's credentials (AZURE_STORAGE_* or storage_options)",
}


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (third-party errors can span pages)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def backend_error(exc: BaseException) -> str | None:
    """One line for an error an object store's client raised (no credentials, an endpoint it cannot reach...)
    with what to do about it; None for any other error. Errors the clients already give as ``OSError``
    (a missing key, access denied) are not theirs alone and are left to the caller."""
    module = type(exc).__module__ or ""
    if isinstance(exc, OSError) or not module.startswith(_BACKEND_MODULES):
        return None
    name = type(exc).__name__
    hint = _BACKEND_HINTS.get(name, "check the store's address, credentials and network")
    return f"object storage: {one_line(exc)} ({name}); {hint}"


def read_failure(exc: BaseException) -> str | None:
    """Why a run could not be read, when ``exc`` says its storage failed (an object store's client error, or an
    ``OSError``: a network, a mount that went away); None for any other error. A follow loop that has read
    the run before tries again on these instead of ending."""
    if isinstance(exc, OSError):
        return one_line(exc)
    return backend_error(exc)


def is_remote(path: Any) -> TypeGuard[RemotePath]:
    """Whether ``path`` is a :class:`RemotePath`."""
    return isinstance(path, RemotePath)


@dataclass(frozen=True)
class Entry:
    """A regular file found by :func:`list_files`."""

    name: str
    size: int
    mtime: float
    path: Location


def list_files(folder: Location) -> list[Entry]:
    """The regular files directly in ``folder`` (one listing request on object storage), sorted by name.

    Locally, symbolic links, sockets, FIFOs and folders are left out, a folder that is itself a symbolic link
    is not listed (``[]``), and so is a missing one.
    """
    if isinstance(folder, RemotePath):
        try:
            infos = folder.fs.ls(folder.key, detail=True, refresh=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for info in infos:
            if info.get("type") != "file":
                continue
            name = str(info["name"]).rstrip("/").rsplit("/", 1)[-1]
            out.append(Entry(name, int(info.get("size") or 0), _mtime(info), folder / name))
        return sorted(out, key=lambda e: e.name)
    folder = Path(folder)
    out = []
    try:
        if stat_mod.S_ISLNK(os.lstat(folder).st_mode):
            return []  # a linked stats/, tokens/ or writers/ would lead out of the run folder
        with os.scandir(folder) as it:
            for e in it:
                try:
                    if not e.is_file(follow_symlinks=False):
                        continue
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                out.append(Entry(e.name, st.st_size, st.st_mtime, folder / e.name))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(out, key=lambda e: e.name)


def list_folders(folder: Location) -> tuple[list[Entry], set[str]]:
    """The regular files directly in ``folder`` (as :func:`list_files`) and the names of its sub-folders, from one
    listing request on object storage (a sub-folder there is a prefix holding objects)."""
    if isinstance(folder, RemotePath):
        try:
            infos = folder.fs.ls(folder.key, detail=True, refresh=True)
        except (FileNotFoundError, NotADirectoryError):
            return [], set()
        files, subs = [], set()
        for info in infos:
            name = str(info["name"]).rstrip("/").rsplit("/", 1)[-1]
            if info.get("type") == "file":
                files.append(Entry(name, int(info.get("size") or 0), _mtime(info), folder / name))
            elif info.get("type") == "directory":
                subs.add(name)
        return sorted(files, key=lambda e: e.name), subs
    subs = set()
    try:
        if not stat_mod.S_ISLNK(os.lstat(folder).st_mode):
            with os.scandir(folder) as it:
                subs = {e.name for e in it if e.is_dir(follow_symlinks=False)}
    except OSError:
        pass
    return list_files(folder), subs


def _open_local(path: Path) -> int:
    """A read-only descriptor of a regular file; never follows a final symbolic link, never blocks on a FIFO."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "a symbolic link; rldiag reads only regular files of a run", str(path)) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file; rldiag reads only regular files of a run", str(path))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_binary(path: Location) -> BinaryIO:
    """A binary reader of the file at ``path`` (a regular file, for local paths)."""
    if isinstance(path, RemotePath):
        return path.open("rb")
    return os.fdopen(_open_local(Path(path)), "rb")


def read_limited(path: Location, limit: int) -> bytes:
    """At most ``limit`` bytes of the file at ``path`` (callers pass their bound + 1 to detect larger files)."""
    with open_binary(path) as fh:
        return fh.read(limit)


def write_whole(path: Location, data: bytes) -> None:
    """Publish ``data`` at ``path`` so that no reader ever sees part of it.

    Object storage: one PUT of the whole object. Local: a temporary name in the same folder, ``fsync``, then
    ``os.replace``.
    """
    if isinstance(path, RemotePath):
        path.fs.pipe_file(path.key, bytes(data))
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_once(path: RemotePath, data: bytes) -> bool:
    """Create the object at ``path`` unless one exists (a conditional write); True when this call created it.

    Where the store has no conditional write, the object is written when absent; two writers racing then
    each write a whole object and the last one stays (the manifest's content is the same from every rank).
    """
    try:
        with path.fs.open(path.key, "xb") as f:
            f.write(data)
        return True
    except FileExistsError:
        return False
    except (NotImplementedError, ValueError, TypeError):
        if path.exists():
            return False
        write_whole(path, data)
        return True


def parquet_source(path: Location) -> Any:
    """What :mod:`pyarrow.parquet` reads ``path`` from: a local file name (checked to be a regular file, not a
    link or a FIFO, so pyarrow's native reader keeps the GIL free) or an fsspec file object (random access;
    closed when garbage-collected or by the caller)."""
    if isinstance(path, RemotePath):
        return path.fs.open(path.key, "rb", cache_type="readahead")
    st = os.lstat(path)
    if not stat_mod.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "not a regular file; rldiag reads only regular files of a run", str(path))
    return str(path)
