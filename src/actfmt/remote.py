"""Object storage through fsspec: ``s3://``, ``gs://``, ``memory://`` and any other fsspec protocol.

A URL becomes a :class:`RemotePath`: a ``PurePosixPath`` bound to one fsspec filesystem (protocol + storage
options) with the few I/O methods actfmt's walkers use (``exists``, ``is_dir``, ``iterdir``, ``read_bytes``,
...), so discovery, planning and the rules run unchanged over a bucket.  ``file://`` URLs map to plain local
paths (the fast local code runs).  Readers that need more than that (ranged reads of ``.pt`` shards, zarr chunk
keys) live in :mod:`actfmt.formats.pt_remote` and :mod:`actfmt.formats.zarr_remote`.

Credentials and endpoints come the standard way: the environment as the filesystem library reads it (for S3:
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` / ``AWS_PROFILE`` /
``AWS_ENDPOINT_URL``; for GCS: ``GOOGLE_APPLICATION_CREDENTIALS``), or ``storage_options`` (the CLI's
``--storage-options JSON``) passed to ``fsspec``.  They never appear in a message: errors are re-raised as
:class:`~actfmt.errors.RemoteStorageError` with every secret-looking value redacted, and a RemotePath's
``str``/``repr`` is its URL only.

Writing to object storage (``actfmt convert ... s3://bucket/out --to zarr``) differs from a local disk: there
is no rename, so a split is written in place and the ``actfmt`` block (the completeness mark) is the last object
written — a partial store never looks complete (ACT603).  The lock is an object created with an exclusive
write (``If-None-Match: *`` on S3) holding a unique token, checked again before the completeness mark is
written; a killed run leaves it behind (delete it by hand; the error names it).  ``--resume`` continues layer
by layer from a state object beside the store.

This module imports only the standard library at import time; fsspec is imported on first use.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar

from actfmt.errors import ActfmtError, RemoteStorageError

if TYPE_CHECKING:  # pragma: no cover
    from actfmt.convert import ConvertResult, LayerRunner, SplitJob
    from actfmt.formats.base import WriteOptions
    from actfmt.progress import ProgressCallback

__all__ = [
    "RemotePath",
    "as_path",
    "is_remote",
    "is_url",
    "parse_storage_options",
    "redact",
    "url_to_fs",
]

_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
#: Keys of storage options whose values are secrets (matched as substrings, case-insensitively).
_SECRET_KEYS = ("secret", "token", "password", "passwd", "key", "credential", "signature", "auth")
#: Environment variables whose values are secrets.
_SECRET_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
    "GOOGLE_OAUTH_ACCESS_TOKEN",
)
_CRED_HINT = (
    "check the credentials (environment: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE, "
    "GOOGLE_APPLICATION_CREDENTIALS ...; or --storage-options)"
)


# ----------------------------------------------------------------------------------------------------------
# URLs and filesystems


def is_url(path: Any) -> bool:
    """Is ``path`` an fsspec URL (``s3://...``, ``memory://...``, ``file://...``) or a :class:`RemotePath`?"""
    return isinstance(path, RemotePath) or (isinstance(path, str) and _URL_RE.match(path) is not None)


def is_remote(path: Any) -> bool:
    """Is ``path`` on object storage (a :class:`RemotePath`, or a URL other than ``file://``)?"""
    if isinstance(path, RemotePath):
        return True
    m = _URL_RE.match(path) if isinstance(path, str) else None
    return m is not None and m.group(1).lower() not in ("file", "local")


def parse_storage_options(text: str | None) -> dict[str, Any] | None:
    """``--storage-options JSON`` -> a dict (an :class:`~actfmt.errors.ActfmtError` that never echoes it)."""
    if text is None or not text.strip():
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ActfmtError(
            f"--storage-options is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            f"give an object such as '{{\"anon\": true}}'."
        ) from None
    if not isinstance(data, dict):
        raise ActfmtError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'.")
    return data


def url_to_fs(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """``(filesystem, path)`` for ``url`` (``fsspec.core.url_to_fs``), with a clean error when the protocol's
    package is missing."""
    try:
        import fsspec.core
    except ImportError:
        raise RemoteStorageError(
            f"{_display(url)}: object storage needs fsspec; install it with: pip install 'actfmt[remote]'"
        ) from None
    try:
        return fsspec.core.url_to_fs(url, **dict(storage_options or {}))  # type: ignore[no-any-return]
    except ImportError as exc:
        raise RemoteStorageError(
            f"{_display(url)}: {redact(str(exc), storage_options)}; for s3:// install 'actfmt[remote]', "
            f"for gs:// gcsfs, for az:// adlfs."
        ) from None
    except (ValueError, TypeError) as exc:
        raise RemoteStorageError(
            f"{_display(url)}: cannot use these storage options ({redact(str(exc), storage_options)}); "
            f"check --storage-options."
        ) from None


def _display(url: str) -> str:
    """A URL without any ``user:password@`` part."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1", url)


def _secrets(options: Any) -> Iterator[str]:
    if isinstance(options, Mapping):
        for k, v in options.items():
            if isinstance(v, (Mapping, list, tuple)):
                yield from _secrets(v)
            elif isinstance(v, str) and any(s in str(k).lower() for s in _SECRET_KEYS):
                yield v
    elif isinstance(options, (list, tuple)):
        for v in options:
            yield from _secrets(v)


def redact(text: str, storage_options: Any = None) -> str:
    """``text`` with every secret of ``storage_options`` and of the environment replaced by ``***``."""
    values = [*_secrets(storage_options), *(os.environ.get(k, "") for k in _SECRET_ENV)]
    for v in sorted({v for v in values if len(v) >= 4}, key=len, reverse=True):
        text = text.replace(v, "***")
    return text


# ----------------------------------------------------------------------------------------------------------
# RemotePath


def _freeze(options: Any) -> str:
    return json.dumps(options or {}, sort_keys=True, default=repr)


_CLASSES: dict[tuple[str, str], type[RemotePath]] = {}
_CLASSES_LOCK = threading.Lock()


def _bound_class(scheme: str, options: Mapping[str, Any] | None) -> type[RemotePath]:
    key = (scheme, _freeze(options))
    with _CLASSES_LOCK:
        cls = _CLASSES.get(key)
        if cls is None:
            cls = type("RemotePath", (RemotePath,), {"scheme": scheme, "_options": dict(options or {})})
            _CLASSES[key] = cls
        return cls


def _restore(scheme: str, options: dict[str, Any], key: str) -> RemotePath:
    return _bound_class(scheme, options)(key)


def as_path(
    path: str | os.PathLike[str] | RemotePath, storage_options: Mapping[str, Any] | None = None
) -> Path:
    """A :class:`RemotePath` for an object-storage URL, a local ``Path`` for anything else (``file://`` too).

    ``storage_options`` applies to URLs only (a local path ignores them).  (Typed ``Path``: a RemotePath offers
    the part of ``Path`` that actfmt's walkers use.)
    """
    if isinstance(path, RemotePath):
        return path  # type: ignore[return-value]
    if isinstance(path, str):
        m = _URL_RE.match(path)
        if m is not None:
            scheme = m.group(1).lower()
            if scheme in ("file", "local"):
                return Path(path[m.end() :] or "/")
            fs, key = url_to_fs(path, storage_options)
            cls = _bound_class(scheme, storage_options)
            cls._fs_cache[os.getpid()] = fs
            return cls(key.rstrip("/") or key)  # type: ignore[return-value]
    return Path(path)


@dataclass
class _Entry:
    """One listing entry, shaped like ``os.DirEntry`` for the walkers."""

    name: str
    path: RemotePath
    type: str

    def is_dir(self) -> bool:
        return self.type == "directory"

    def is_file(self) -> bool:
        return self.type != "directory"


class RemotePath(PurePosixPath):
    """A path on object storage: ``PurePosixPath`` arithmetic plus the I/O actfmt's walkers need.

    ``str()`` is the URL (``s3://bucket/key``); the storage options (credentials) are kept on the class and
    never shown.  Instances pickle with their options, so dask workers can open them.
    """

    scheme: ClassVar[str] = ""
    _options: ClassVar[dict[str, Any]] = {}
    _fs_cache: ClassVar[dict[int, Any]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._fs_cache = {}

    # -- identity --------------------------------------------------------------------------------------
    @property
    def key(self) -> str:
        """The path as the filesystem spells it (``bucket/key``; ``/key`` for ``memory``)."""
        return PurePosixPath.__str__(self)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.key.lstrip('/')}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __reduce__(self) -> Any:
        return (_restore, (self.scheme, dict(self._options), self.key))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RemotePath):
            return NotImplemented
        return type(self) is type(other) and self.key == other.key

    def __hash__(self) -> int:
        return hash((type(self), self.key))

    @property
    def storage_options(self) -> dict[str, Any]:
        return dict(self._options)

    @property
    def fs(self) -> Any:
        """The fsspec filesystem (one per process)."""
        pid = os.getpid()
        fs = self._fs_cache.get(pid)
        if fs is None:
            fs, _ = url_to_fs(str(self), self._options)
            self._fs_cache[pid] = fs
        return fs

    def absolute(self) -> RemotePath:
        return self

    def resolve(self, strict: bool = False) -> RemotePath:
        return self

    # -- errors ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _io(self, what: str = "") -> Iterator[None]:
        """Re-raise the filesystem's errors without secrets: FileNotFoundError stays itself (with the URL),
        the rest becomes :class:`~actfmt.errors.RemoteStorageError` (an ``OSError``)."""
        try:
            yield
        except ActfmtError:
            raise
        except FileNotFoundError:
            raise FileNotFoundError(2, "No such file or directory", str(self)) from None
        except IsADirectoryError:
            raise IsADirectoryError(21, "Is a directory", str(self)) from None
        except PermissionError as exc:
            raise _remote_error(
                self, f"access denied ({redact(str(exc), self._options)}); {_CRED_HINT}"
            ) from None
        except (OSError, ValueError, TypeError, RuntimeError) as exc:
            raise _remote_error(self, redact(_describe(exc), self._options)) from None
        except Exception as exc:  # botocore / aiohttp / google-auth errors do not share a base class
            raise _remote_error(self, redact(_describe(exc), self._options)) from None

    # -- queries ---------------------------------------------------------------------------------------
    def _cached_info(self) -> dict[str, Any] | None:
        return self.__dict__.get("_info")

    def info(self) -> dict[str, Any]:
        cached = self._cached_info()
        if cached is not None:
            return cached
        with self._io():
            out: dict[str, Any] = self.fs.info(self.key)
        return out

    def exists(self) -> bool:
        if self._cached_info() is not None:
            return True
        with self._io():
            return bool(self.fs.exists(self.key))

    def is_dir(self) -> bool:
        cached = self._cached_info()
        if cached is not None:
            return cached.get("type") == "directory"
        with self._io():
            return bool(self.fs.isdir(self.key))

    def is_file(self) -> bool:
        cached = self._cached_info()
        if cached is not None:
            return cached.get("type") != "directory"
        with self._io():
            return bool(self.fs.isfile(self.key))

    def is_symlink(self) -> bool:
        return False

    def size(self) -> int:
        info = self.info()
        return int(info.get("size") or 0)

    def stat(self) -> SimpleNamespace:
        return SimpleNamespace(st_size=self.size())

    def _listing(self) -> list[_Entry]:
        with self._io():
            raw = self.fs.ls(self.key, detail=True)
        me = self.key.rstrip("/")
        out: dict[str, _Entry] = {}
        for info in raw:
            name = str(info["name"]).rstrip("/")
            if name == me or not name:
                continue
            base = name.rsplit("/", 1)[-1]
            child = self / base
            child.__dict__["_info"] = dict(info, type=info.get("type", "file"))
            out.setdefault(base, _Entry(base, child, child.__dict__["_info"]["type"]))
        return [out[k] for k in sorted(out)]

    def iterdir(self) -> Iterator[RemotePath]:
        for e in self._listing():
            yield e.path

    @contextlib.contextmanager
    def scandir(self) -> Iterator[Iterator[_Entry]]:
        """Like ``os.scandir``: entries with ``name``, ``path`` and ``is_dir()`` (one listing request)."""
        yield iter(self._listing())

    def glob(self, pattern: str) -> Iterator[RemotePath]:
        """Children matching ``pattern`` (one level only: all actfmt asks for)."""
        import fnmatch

        for e in self._listing():
            if fnmatch.fnmatchcase(e.name, pattern):
                yield e.path

    def prefetch(self) -> None:
        """List everything below this prefix in one (paginated) request; filesystems with a listing cache
        (s3fs, gcsfs) then answer a whole tree walk from it.  Errors surface on the walk's own requests."""
        with contextlib.suppress(Exception):
            self.fs.find(self.key, withdirs=True)

    def find(self) -> dict[str, dict[str, Any]]:
        """Every object below this prefix, ``{key: info}``, in one (paginated) listing."""
        with self._io():
            return dict(self.fs.find(self.key, detail=True))

    def du(self) -> int:
        """Bytes stored below this prefix (or the object's size)."""
        return sum(int(i.get("size") or 0) for i in self.find().values()) if self.is_dir() else self.size()

    # -- reading ---------------------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        with self._io():
            return bytes(self.fs.cat_file(self.key))

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self.read_bytes().decode(encoding, errors)

    def read_range(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` (one ranged GET)."""
        with self._io():
            return bytes(self.fs.cat_file(self.key, start=start, end=end))

    def read_ranges(
        self, ranges: list[tuple[int, int]], paths: list[RemotePath] | None = None, missing_ok: bool = False
    ) -> list[bytes | None]:
        """Several ranges (of this object, or of ``paths[i]``) fetched concurrently where the filesystem can;
        with ``missing_ok`` a missing object gives ``None``."""
        if not ranges:
            return []
        targets = paths if paths is not None else [self] * len(ranges)
        with self._io():
            got = self.fs.cat_ranges(
                [p.key for p in targets], [a for a, _ in ranges], [b for _, b in ranges], on_error="return"
            )
        out: list[bytes | None] = []
        for p, g in zip(targets, got, strict=True):
            if isinstance(g, FileNotFoundError) and missing_ok:
                out.append(None)
            elif isinstance(g, BaseException):
                with p._io():
                    raise g
            else:
                out.append(bytes(g))
        return out

    def open(self, mode: str = "rb", **kwargs: Any) -> Any:  # type: ignore[override]
        with self._io():
            return self.fs.open(self.key, mode, **kwargs)

    # -- writing ---------------------------------------------------------------------------------------
    def write_bytes(self, data: bytes) -> None:
        with self._io():
            self.fs.pipe_file(self.key, bytes(data))

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def create_exclusive(self, data: bytes) -> bool:
        """Write ``data`` only if nothing is there (``If-None-Match: *`` on S3); ``False`` when taken."""
        try:
            with self._io():
                self.fs.pipe_file(self.key, bytes(data), mode="create")
        except FileExistsError:
            return False
        except RemoteStorageError:
            if self.exists():
                return False
            raise
        return True

    def pipe(self, items: Mapping[RemotePath, bytes]) -> None:
        """Write several objects (concurrently where the filesystem can)."""
        if items:
            with self._io():
                self.fs.pipe({p.key: bytes(v) for p, v in items.items()})

    def mkdir(self, mode: int = 0o777, parents: bool = False, exist_ok: bool = False) -> None:
        """Object storage has no directories: nothing to do."""

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            with self._io():
                self.fs.rm_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmtree(self) -> None:
        """Remove every object below this prefix."""
        with contextlib.suppress(FileNotFoundError), self._io():
            self.fs.rm(self.key, recursive=True)
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(self.key)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"


def _remote_error(path: RemotePath, detail: str) -> RemoteStorageError:
    err = RemoteStorageError(f"{path}: {detail}")
    err.strerror = detail
    return err


def refuse_remote(path: Any, fmt: str) -> None:
    """Raise a clean error for a format actfmt does not read from object storage."""
    if isinstance(path, RemotePath):
        from actfmt.errors import FormatError

        raise FormatError(
            f"{path}: {fmt} on {path.scheme}:// is not supported; convert it to zarr (readable in place on "
            f"object storage), or download it first."
        )


# ----------------------------------------------------------------------------------------------------------
# ranged reads of zip archives (.pt shards)

#: Bytes read at each end of a shard by a header-only probe: the zip's data.pkl (and the local header of the
#: tensor's data record) sit at the start, the central directory at the end.  More is fetched if needed.
HEAD_BYTES = 1024
TAIL_BYTES = 1024


class RangeFile(io.RawIOBase):
    """A read-only, seekable file over an object, serving reads from prefetched blocks and fetching the rest.

    ``fetched`` counts the bytes requested from storage (prefetch included).
    """

    def __init__(self, path: RemotePath, size: int, blocks: dict[int, bytes] | None = None) -> None:
        super().__init__()
        self._path, self._size, self._pos = path, size, 0
        self._blocks = dict(blocks or {})
        self.fetched = sum(len(b) for b in self._blocks.values())

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def _cached(self, start: int, end: int) -> bytes | None:
        for b0, data in self._blocks.items():
            if b0 <= start and end <= b0 + len(data):
                return data[start - b0 : end - b0]
        return None

    def read(self, n: int = -1) -> bytes:
        start = self._pos
        end = self._size if n is None or n < 0 else min(self._size, start + n)
        if end <= start:
            return b""
        data = self._cached(start, end)
        if data is None:
            data = self._path.read_range(start, end)
            self.fetched += len(data)
            self._blocks[start] = data
        self._pos = start + len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def shard_ranges(size: int) -> list[tuple[int, int]]:
    """The byte ranges a header-only probe reads from a shard of ``size`` bytes."""
    if size <= 0:
        return []
    if size <= HEAD_BYTES + TAIL_BYTES:
        return [(0, size)]
    return [(0, HEAD_BYTES), (size - TAIL_BYTES, size)]


def prefetch_shards(paths: list[RemotePath]) -> None:
    """Fetch the head and tail of every shard in one batch of concurrent ranged reads; each path keeps its
    blocks (``_blocks``) for :func:`open_shard`.  Sizes come from the listing (no extra request)."""
    todo = [p for p in paths if isinstance(p, RemotePath) and "_blocks" not in p.__dict__]
    if not todo:
        return
    reqs: list[tuple[RemotePath, int, int]] = []
    for p in todo:
        for a, b in shard_ranges(p.size()):
            reqs.append((p, a, b))
    try:
        got = todo[0].read_ranges([(a, b) for _, a, b in reqs], [p for p, _, _ in reqs])
    except OSError:  # each probe then fetches its own ranges and reports its own error
        return
    for (p, a, _), data in zip(reqs, got, strict=True):
        if data is not None:
            p.__dict__.setdefault("_blocks", {})[a] = data


def open_shard(path: RemotePath) -> RangeFile:
    """A :class:`RangeFile` over a shard, primed with its head and tail (prefetched or fetched now)."""
    size = path.size()
    blocks = path.__dict__.pop("_blocks", None)
    if blocks is None:
        ranges = shard_ranges(size)
        got = path.read_ranges(ranges)
        blocks = {a: data for (a, _), data in zip(ranges, got, strict=True) if data is not None}
    return RangeFile(path, size, blocks)


@contextlib.contextmanager
def local_copy(path: RemotePath) -> Iterator[Path]:
    """Download one object into a temporary file (for the rare files only torch can judge)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="actfmt-remote-") as tmp:
        local = Path(tmp) / path.name
        local.write_bytes(path.read_bytes())
        yield local


def relabel(exc: BaseException, local: Path, path: RemotePath) -> BaseException:
    """The same exception with the temporary local path in its message replaced by the URL."""
    if isinstance(exc, ActfmtError) and exc.args and isinstance(exc.args[0], str):
        exc.args = (exc.args[0].replace(str(local), str(path)), *exc.args[1:])
    return exc


# ----------------------------------------------------------------------------------------------------------
# conversion into object storage


class RemoteLock:
    """A lock object beside a remote destination: created exclusively, holding a unique token.

    Limits (object storage has no kernel lock): a process killed while holding it leaves the object behind —
    the next run refuses and names it (delete it once no conversion runs); on stores without exclusive
    creation a read-back of the token narrows, but cannot close, the race between two runs starting at once.
    """

    def __init__(self, final: RemotePath) -> None:
        self.final = final
        self.path = final.with_name(f".{final.name}.actfmt-lock")
        self.token = uuid.uuid4().hex

    def _body(self) -> bytes:
        import socket
        from datetime import UTC, datetime

        return json.dumps(
            {
                "token": self.token,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        ).encode()

    def _refuse(self) -> ActfmtError:
        from actfmt.errors import LockedError

        return LockedError(
            f"{self.final}: another actfmt convert is writing this destination (lock object {self.path}); "
            f"wait for it to finish, or, if no conversion is running (a killed run), delete that object."
        )

    def holds(self) -> bool:
        try:
            data = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and data.get("token") == self.token

    def check(self) -> None:
        """Raise :class:`~actfmt.errors.LockedError` unless the lock object still holds this run's token."""
        if not self.holds():
            raise self._refuse()

    def __enter__(self) -> RemoteLock:
        if not self.path.create_exclusive(self._body()):
            raise self._refuse()
        self.check()  # read back: on stores where the exclusive create is not atomic, the last writer wins
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            if self.holds():
                self.path.unlink(missing_ok=True)


def convert_split_remote(
    job: SplitJob,
    to: str,
    options: WriteOptions,
    workers: int,
    overwrite: bool,
    resume: bool,
    verify: bool,
    dtype: str | None,
    progress: ProgressCallback | None,
    result: ConvertResult,
    runner: LayerRunner | None = None,
) -> None:
    """Convert one split into object storage (``job.destination`` is a :class:`RemotePath`).

    In place, with the completeness mark written last (there is no rename); see the module docstring.
    """
    import importlib

    cv = importlib.import_module("actfmt.convert")  # (``actfmt.convert`` the attribute is the function)
    from actfmt.errors import ConversionError, DestinationExistsError
    from actfmt.formats import get_format, open_reader

    final = job.destination
    assert isinstance(final, RemotePath)
    if to != "zarr":
        raise ConversionError(
            f"{final}: writing {to} to {final.scheme}:// is not supported; convert to zarr (chunked objects, "
            f"the object-storage format), or convert locally and upload the result."
        )
    state_path = final.with_name(f".{final.name}.actfmt-state.json")
    if final.exists():
        if resume and cv._is_complete(final, to):
            result.skipped.append(job)
            return
        if not overwrite and not (resume and state_path.exists()):
            raise DestinationExistsError(
                f"{final}: already exists; pass --overwrite to replace it"
                + (" (it is not a conversion --resume can continue: no state object)." if resume else ".")
            )
    with RemoteLock(final) as lock, open_reader(job.source, job.source_format) as reader:
        spec = cv._spec_for(reader, job.source_format, dtype)
        cast_from = {a.name: a.dtype for a in reader.layers if dtype is not None and a.dtype != dtype}
        if cast_from:
            casts = sorted({f"{a} -> {dtype}" for a in cast_from.values()})
            result.warnings.append(
                f"{job.location}: values cast {', '.join(casts)} (--dtype); not bit-exact."
            )
        writer_cls = get_format(to).writer_class()
        done: dict[str, str] = {}
        if resume and final.exists() and state_path.exists():
            try:
                state = json.loads(state_path.read_bytes())
                done = {k: v for k, v in state.get("layers", {}).items() if isinstance(v, str)}
            except (OSError, ValueError, AttributeError):
                done = {}
            writer = writer_cls.open(final, spec, options)
        else:
            if final.exists():  # --overwrite: no atomic replace on object storage; the old store goes first
                final.rmtree()
            state_path.unlink(missing_ok=True)
            writer = writer_cls.create(final, spec, options)
        try:
            if runner is not None:
                writer.close()
                tasks = cv._layer_tasks(job, final, to, spec, options, writer_cls, done)  # type: ignore[arg-type]
                cv._run_layer_tasks(job, spec, tasks, runner, done, state_path, progress, result)  # type: ignore[arg-type]
            else:
                cv._write_layers(
                    job,
                    spec,
                    reader,
                    writer,
                    writer_cls,
                    workers,
                    done,
                    state_path,
                    progress,
                    result,  # type: ignore[arg-type]
                )
        finally:
            writer.close()
        if verify:
            cv._verify_written(job, final, to, spec, done, progress)  # type: ignore[arg-type]
        lock.check()  # still ours: only then write the completeness mark
        writer = writer_cls.open(final, spec, options)
        try:
            writer.finalize(cv._actfmt_block(job, spec, done, options, cast_from))
        finally:
            writer.close()
        state_path.unlink(missing_ok=True)
    result.splits.append(job)
    result.checksums[job.location] = dict(done)
