"""Object storage through fsspec: ``s3://``, ``gs://``, ``memory://`` and any other fsspec protocol.

A URL becomes an :class:`FsspecLocation`: a key bound to one fsspec filesystem (protocol + storage options).
Batched ranged reads use ``cat_ranges`` (concurrent GETs), many writes ``pipe`` (concurrent PUTs).  Listings
are cached per walk: :meth:`FsspecLocation.prefetch` lists a whole prefix once and a walk then costs no request;
every child made by :meth:`FsspecLocation.list_dir` carries its size, so reading a file's tail needs no HEAD.

Credentials and endpoints come the standard way: the environment as the filesystem library reads it (for S3:
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` / ``AWS_PROFILE`` /
``AWS_ENDPOINT_URL``; for GCS: ``GOOGLE_APPLICATION_CREDENTIALS``), or ``storage_options`` passed to fsspec.
They never appear in a message: errors become :class:`~actfmt.errors.RemoteStorageError` with every
secret-looking value redacted, and a location's ``str``/``repr`` is its URL only.

**Timeouts.**  A storage endpoint that accepts a connection and never answers must not hang a run: every
request has a connect timeout (default 10 s) and a read timeout (default 30 s: no byte for that long), with at
most one retry, and a timeout that fires is a :class:`~actfmt.errors.RemoteStorageError` naming the URL (never
the credentials) and the setting to change.  Set them with the storage options ``connect_timeout`` and
``read_timeout`` (seconds; taken by actfmt, translated for the filesystem: botocore's config for ``s3://``,
aiohttp's for ``http(s)://``) or the environment variables ``ACTFMT_CONNECT_TIMEOUT`` /
``ACTFMT_READ_TIMEOUT``.  Options the filesystem itself takes (``config_kwargs``, ``client_kwargs``) win.

fsspec is imported on first use.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import IO, Any

from actfmt.errors import ActfmtError, RemoteStorageError
from actfmt.storage.base import Entry, Kind, Location, OutputFile, Stat

__all__ = ["FsspecLocation", "fsspec_options", "redact", "timeouts", "url_to_fs"]

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


def display_url(url: str) -> str:
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


#: Seconds to wait for a connection / for the next byte of an answer, unless configured (module docstring).
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 30.0
TIMEOUT_KEYS = ("connect_timeout", "read_timeout")


def timeouts(storage_options: Mapping[str, Any] | None) -> tuple[float, float]:
    """``(connect, read)`` timeouts in seconds: the storage options', else the environment's, else the defaults.
    A value that is not a positive number is an :class:`~actfmt.errors.ActfmtError` naming where it came from."""
    out = []
    for key, env, default in (
        ("connect_timeout", "ACTFMT_CONNECT_TIMEOUT", CONNECT_TIMEOUT),
        ("read_timeout", "ACTFMT_READ_TIMEOUT", READ_TIMEOUT),
    ):
        given = (storage_options or {}).get(key)
        where = f"--storage-options {key}"
        if given is None and os.environ.get(env, "").strip():
            given, where = os.environ[env].strip(), env
        if given is None:
            out.append(default)
            continue
        try:
            value = float(given)
        except (TypeError, ValueError):
            value = -1.0
        if not value > 0 or value != value or value == float("inf"):
            raise ActfmtError(f"{where} must be a positive number of seconds, got {str(given)[:40]!r}.")
        out.append(value)
    return out[0], out[1]


def _with_timeouts(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The options for fsspec: actfmt's timeout keys removed and translated for the filesystem."""
    options = {k: v for k, v in (storage_options or {}).items() if k not in TIMEOUT_KEYS}
    connect, read = timeouts(storage_options)
    m = _URL_RE.match(url)
    scheme = m.group(1).lower() if m else ""
    if scheme in ("s3", "s3a"):
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("connect_timeout", connect)
        config.setdefault("read_timeout", read)
        config.setdefault("retries", {"total_max_attempts": 2, "mode": "standard"})  # one retry, not 4 x 5
        options["config_kwargs"] = config
    elif scheme in ("http", "https"):
        client = dict(options.get("client_kwargs") or {})
        if "timeout" not in client:
            import aiohttp

            client["timeout"] = aiohttp.ClientTimeout(total=None, connect=connect, sock_read=read)
        options["client_kwargs"] = client
    return options


def fsspec_options(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The storage options to give fsspec (or a library that builds its own filesystem, such as zarr-python's
    ``FsspecStore``) for ``url``: actfmt's timeouts translated (see the module docstring)."""
    return _with_timeouts(url, storage_options)


def _is_timeout(exc: BaseException) -> bool:
    """A timeout anywhere in the chain (botocore's ReadTimeoutError, aiohttp's, asyncio's, socket's)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, TimeoutError) or "Timeout" in type(e).__name__:
            return True
        e = e.__cause__ or e.__context__
    return False


def url_to_fs(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """``(filesystem, path)`` for ``url`` (``fsspec.core.url_to_fs``), with a clean error when the protocol's
    package is missing, and actfmt's timeouts (see the module docstring)."""
    try:
        import fsspec.core
    except ImportError:
        raise RemoteStorageError(
            f"{display_url(url)}: object storage needs fsspec; install it with: pip install 'actfmt[remote]'"
        ) from None
    try:
        fs, path = fsspec.core.url_to_fs(url, **_with_timeouts(url, storage_options))
        if hasattr(fs, "retries") and isinstance(fs.retries, int):
            fs.retries = min(fs.retries, 1)  # s3fs retries on top of botocore's: a dead endpoint x 5 more
        return fs, path
    except ImportError as exc:
        raise RemoteStorageError(
            f"{display_url(url)}: {redact(str(exc), storage_options)}; for s3:// install 'actfmt[remote]', "
            f"for gs:// gcsfs, for az:// adlfs."
        ) from None
    except (ValueError, TypeError) as exc:
        raise RemoteStorageError(
            f"{display_url(url)}: cannot use these storage options ({redact(str(exc), storage_options)}); "
            f"check --storage-options."
        ) from None


def _freeze(options: Any) -> str:
    return json.dumps(options or {}, sort_keys=True, default=repr)


_FS: dict[tuple[str, str, int], Any] = {}
_FS_LOCK = threading.Lock()


def _restore(
    scheme: str, key: str, options: dict[str, Any], expected: tuple[Any, ...] | None
) -> FsspecLocation:
    loc = FsspecLocation(scheme, key, options)
    loc.expected = expected
    return loc


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"


class FsspecLocation(Location):
    """A key on an fsspec filesystem.  ``str()`` is the URL; the options (credentials) are never shown."""

    supports_rename = False
    merge_gap = 8 << 10

    def __init__(self, scheme: str, key: str, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(key)
        self.scheme = scheme
        self._options = dict(options or {})
        self._frozen = _freeze(self._options)
        self._cached: Stat | None = None

    @classmethod
    def from_url(cls, url: str, storage_options: Mapping[str, Any] | None = None) -> FsspecLocation:
        m = _URL_RE.match(url)
        assert m is not None, url
        scheme = m.group(1).lower()
        fs, key = url_to_fs(url, storage_options)
        loc = cls(scheme, key.rstrip("/") or key, storage_options)
        with _FS_LOCK:
            _FS[(scheme, loc._frozen, os.getpid())] = fs
        return loc

    def _with_path(self, path: str) -> FsspecLocation:
        return FsspecLocation(self.scheme, path, self._options)

    def _storage_key(self) -> Any:
        return (self.scheme, self._frozen)

    def __str__(self) -> str:
        return f"{self.scheme}://{self._path.lstrip('/')}"

    def __reduce__(self) -> Any:
        return (_restore, (self.scheme, self._path, self._options, self.expected))

    @property
    def storage_options(self) -> dict[str, Any]:
        return dict(self._options)

    @property
    def fs(self) -> Any:
        """The fsspec filesystem (one per process and set of options)."""
        key = (self.scheme, self._frozen, os.getpid())
        fs = _FS.get(key)
        if fs is None:
            fs, _ = url_to_fs(str(self), self._options)
            with _FS_LOCK:
                _FS[key] = fs
        return fs

    # -- errors -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _io(self) -> Iterator[None]:
        """The filesystem's errors without secrets: ``FileNotFoundError`` stays itself (with the URL), the
        rest becomes :class:`~actfmt.errors.RemoteStorageError` (an ``OSError``)."""
        try:
            yield
        except ActfmtError:
            raise
        except FileNotFoundError:
            raise FileNotFoundError(2, "No such file or directory", str(self)) from None
        except IsADirectoryError:
            raise IsADirectoryError(21, "Is a directory", str(self)) from None
        except FileExistsError:
            raise FileExistsError(17, "File exists", str(self)) from None
        except PermissionError as exc:
            raise self.error(f"access denied ({redact(str(exc), self._options)}); {_CRED_HINT}") from None
        except Exception as exc:  # botocore / aiohttp / google-auth errors do not share a base class
            if _is_timeout(exc):
                raise self.timeout_error() from None
            raise self.error(redact(_describe(exc), self._options)) from None

    def timeout_error(self) -> RemoteStorageError:
        connect, read = timeouts(self._options)
        return self.error(
            f"the storage endpoint did not answer in time (connect timeout {connect:g} s, read timeout "
            f"{read:g} s); check the endpoint and the network, or allow more time with --storage-options "
            f"'{{\"read_timeout\": 120}}' or ACTFMT_READ_TIMEOUT=120"
        )

    def error(self, detail: str) -> RemoteStorageError:
        err = RemoteStorageError(f"{self}: {detail}")
        err.strerror = detail
        err.filename = str(self)
        return err

    # -- questions --------------------------------------------------------------------------------------
    def _to_stat(self, info: Mapping[str, Any]) -> Stat:
        kind = Kind.DIR if info.get("type") == "directory" else Kind.FILE
        size = int(info.get("size") or 0)
        tag = (
            info.get("ETag")
            or info.get("etag")
            or info.get("md5Hash")
            or info.get("LastModified")
            or info.get("mtime")
        )
        return Stat(kind, size, 0, (size, str(tag)))

    def stat(self) -> Stat:
        if self._cached is not None:
            return self._cached
        with self._io():
            info = self.fs.info(self._path)
        return self._to_stat(info)

    def list_dir(self) -> list[Entry]:
        with self._io():
            raw = self.fs.ls(self._path, detail=True)
        me = self._path.rstrip("/")
        if len(raw) == 1 and str(raw[0]["name"]).rstrip("/") == me and raw[0].get("type") != "directory":
            # a file: fsspec lists it as itself; a local file cannot be listed either
            raise NotADirectoryError(20, "Not a directory", str(self))
        out: dict[str, Entry] = {}
        for info in raw:
            name = str(info["name"]).rstrip("/")
            if name == me or not name:
                continue
            base = name.rsplit("/", 1)[-1]
            child = self.joinpath(base)
            assert isinstance(child, FsspecLocation)
            child._cached = self._to_stat(info)
            out.setdefault(base, Entry(base, child, child._cached.kind, child._cached.size))
        return [out[k] for k in sorted(out)]

    def prefetch(self) -> None:
        try:
            self.fs.find(self._path, withdirs=True)
        except Exception as exc:  # errors surface on the walk's own requests; a timeout would only repeat
            if _is_timeout(exc):
                raise self.timeout_error() from None

    def find(self) -> dict[str, int]:
        prefix = self._path.rstrip("/") + "/"
        with self._io():
            found = self.fs.find(self._path, detail=True)
        return {k[len(prefix) :]: int(v.get("size") or 0) for k, v in found.items() if k.startswith(prefix)}

    # -- reading ----------------------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        with self._io():
            return bytes(self.fs.cat_file(self._path))

    @classmethod
    def _read_ranges(
        cls, requests: Sequence[tuple[Location, int, int]], missing_ok: bool
    ) -> list[bytes | None]:
        if not requests:
            return []
        first = requests[0][0]
        assert isinstance(first, FsspecLocation)
        with first._io():
            got = first.fs.cat_ranges(
                [loc.path for loc, _, _ in requests],
                [a for _, a, _ in requests],
                [b for _, _, b in requests],
                on_error="return",
            )
        return _results([loc for loc, _, _ in requests], got, missing_ok)

    @classmethod
    def _read_objects(cls, locations: Sequence[Location], missing_ok: bool) -> list[bytes | None]:
        if not locations:
            return []
        first = locations[0]
        assert isinstance(first, FsspecLocation)
        with first._io():
            got = first.fs.cat([loc.path for loc in locations], on_error="return")
        return _results(locations, [got.get(loc.path) for loc in locations], missing_ok)

    def open_input(self) -> IO[bytes]:
        with self._io():
            return self.fs.open(self._path, "rb", block_size=4 << 20, cache_type="blockcache")  # type: ignore[no-any-return]

    # -- writing ----------------------------------------------------------------------------------------
    def write_bytes(self, data: Any, atomic: bool = False) -> None:
        with self._io():  # one PUT: an object appears whole or not at all
            self.fs.pipe_file(self._path, bytes(memoryview(data).cast("B")))

    def put_many(self, items: Mapping[Location, Any]) -> None:
        if not items:
            return
        with self._io():
            self.fs.pipe({loc.path: bytes(memoryview(v).cast("B")) for loc, v in items.items()})

    def open_output(self) -> FsspecOutput:
        return FsspecOutput(self)

    def create_exclusive(self, data: bytes) -> bool:
        try:
            with self._io():
                self.fs.pipe_file(self._path, bytes(data), mode="create")
        except FileExistsError:
            return False
        except RemoteStorageError:
            if self.exists():
                return False
            raise
        return True

    def delete(self, missing_ok: bool = True) -> None:
        try:
            with self._io():
                self.fs.rm_file(self._path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def delete_tree(self) -> None:
        with contextlib.suppress(FileNotFoundError), self._io():
            self.fs.rm(self._path, recursive=True)
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(self._path)


def _results(locations: Sequence[Location], got: Sequence[Any], missing_ok: bool) -> list[bytes | None]:
    """What a batched fsspec call returned per object (``on_error="return"``): the bytes, ``None`` for a
    missing object (with ``missing_ok``), or its error raised without secrets."""
    out: list[bytes | None] = []
    for loc, g in zip(locations, got, strict=True):
        if (g is None or isinstance(g, FileNotFoundError)) and missing_ok:
            out.append(None)
        elif g is None or isinstance(g, BaseException):
            assert isinstance(loc, FsspecLocation)
            with loc._io():
                raise g if g is not None else FileNotFoundError(loc.path)
        else:
            out.append(bytes(g))
    return out


class FsspecOutput(OutputFile):
    """An object written as a stream (a multipart upload on S3); discarded if the writing fails."""

    def __init__(self, location: FsspecLocation) -> None:
        self.location = self._loc = location
        with location._io():
            self._f: Any = location.fs.open(location.path, "wb")
        self._pos = 0

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        with self._loc._io():
            self._f.write(view)
        self._pos += len(view)

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if self._f is not None:
            f, self._f = self._f, None
            with self._loc._io():
                f.close()

    def abort(self) -> None:
        f, self._f = self._f, None
        if f is None:
            return
        discard = getattr(f, "discard", None)
        with contextlib.suppress(Exception):
            if discard is not None:
                discard()
            else:
                f.close()
        # s3fs's discard() drops the buffer but leaves the file open: its __del__ would then flush into a dead
        # upload (an AttributeError in the garbage collector).  (A BytesIO's `closed` cannot be set.)
        with contextlib.suppress(Exception):
            f.closed = True
        if self.location.scheme == "memory":  # memory:// commits an object when it is opened: remove it
            with contextlib.suppress(Exception):
                self._loc.fs.rm_file(self._loc.path)
