"""Compression names -> the numcodecs codec that encodes a chunk, and the codec configuration stored for it.

Names: ``blosc-zstd`` (the default: blosc, zstd level 1, **byte** shuffle, 512 KiB blosc blocks), ``none``,
``zstd``, ``lz4`` (blosc-lz4 + bitshuffle: neither Zarr v3 nor tensorstore's v2 has a plain lz4) and ``gzip``.
``level`` overrides a name's default level.  Byte shuffle with 512 KiB blocks is the default because it
compresses activations well whatever their distribution (bitshuffle collapses on heavy-tailed data) at about
1 GB/s per core.

The stored configurations are exactly what zarr-python 3.1 writes for the same codecs: v3 ``bytes`` (little)
followed by ``blosc`` / ``zstd`` / ``gzip``; v2 the numcodecs ``compressor`` dict.  Reading maps a stored
configuration back to a numcodecs codec, or to ``None`` when actfmt leaves the array to zarr-python.

numcodecs is imported on first use.
"""

from __future__ import annotations

import struct
import threading
from typing import Any

from isal import isal_zlib

from actfmt.errors import ConversionError
from actfmt.storage import Location

__all__ = [
    "BLOSC_BLOCKSIZE",
    "COMPRESSIONS",
    "DEFAULT_LEVEL",
    "LEVEL_RANGE",
    "check_decoded_size",
    "codec_from_v2",
    "codec_from_v3",
    "codec_name",
    "decode_into",
    "numcodec",
    "resolve_compression",
    "stored_codecs",
]

COMPRESSIONS = ("blosc-zstd", "none", "zstd", "lz4", "gzip")  # the first is the default
DEFAULT_LEVEL = {"blosc-zstd": 1, "zstd": 1, "lz4": 5, "gzip": 1}
LEVEL_RANGE = {"blosc-zstd": (0, 9), "zstd": (-131072, 22), "lz4": (0, 9), "gzip": (0, 9)}
BLOSC_BLOCKSIZE = 512 << 10
_SHUFFLE_NAMES = {0: "noshuffle", 1: "shuffle", 2: "bitshuffle"}
_SHUFFLE_IDS = {v: k for k, v in _SHUFFLE_NAMES.items()}
#: numcodecs ids of v2 compressors actfmt decodes itself.
_V2_DIRECT = ("blosc", "zstd", "gzip", "zlib", "lz4")

_ready = False
_ready_lock = threading.Lock()


def _numcodecs() -> Any:
    """numcodecs, with blosc's global thread pool off (as zarr-python does on import): chunks are encoded and
    decoded from several threads, and blosc's own pool is not safe from several threads."""
    global _ready
    import numcodecs
    import numcodecs.blosc

    if not _ready:
        with _ready_lock:
            numcodecs.blosc.use_threads = False
            _ready = True
    return numcodecs


def resolve_compression(
    where: Location, compression: str | None, level: int | None
) -> tuple[str, int | None]:
    """``(name, level)`` for the options given (the default name and level filled in); a clear
    :class:`~actfmt.errors.ConversionError` for an unknown name or a level out of range."""
    name = COMPRESSIONS[0] if compression is None else compression.lower()
    if name not in COMPRESSIONS:
        raise ConversionError(
            f"{where}: the zarr format has no compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}."
        )
    if name == "none":
        return name, None
    lvl = DEFAULT_LEVEL[name] if level is None else int(level)
    lo, hi = LEVEL_RANGE[name]
    if not lo <= lvl <= hi:
        raise ConversionError(f"{where}: --level {lvl} is out of range for {name} ({lo}..{hi}).")
    return name, lvl


def numcodec(name: str, level: int | None, itemsize: int) -> Any:
    """The numcodecs codec that encodes a chunk for compression ``name`` (``None`` when uncompressed)."""
    if name == "none":
        return None
    numcodecs = _numcodecs()
    if name in ("blosc-zstd", "lz4"):
        return numcodecs.Blosc(
            cname="zstd" if name == "blosc-zstd" else "lz4",
            clevel=level,
            shuffle=numcodecs.Blosc.SHUFFLE if name == "blosc-zstd" else numcodecs.Blosc.BITSHUFFLE,
            blocksize=BLOSC_BLOCKSIZE,
            typesize=itemsize,
        )
    if name == "zstd":
        return numcodecs.Zstd(level=level)
    if name == "gzip":
        return numcodecs.GZip(level=level)
    raise AssertionError(name)  # pragma: no cover - resolve_compression checked the name


def stored_codecs(name: str, level: int | None, itemsize: int, zarr_format: int) -> Any:
    """What the array metadata records for compression ``name``: v3 the ``codecs`` list (``bytes`` first),
    v2 the ``compressor`` object (``None`` when uncompressed)."""
    if zarr_format == 2:
        if name == "none":
            return None
        if name in ("blosc-zstd", "lz4"):
            blosc = name == "blosc-zstd"
            return {
                "id": "blosc",
                "cname": "zstd" if blosc else "lz4",
                "clevel": level,
                "shuffle": 1 if blosc else 2,
                "blocksize": BLOSC_BLOCKSIZE,
            }
        return {"id": name, "level": level}
    out: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if name in ("blosc-zstd", "lz4"):
        blosc = name == "blosc-zstd"
        conf = {
            "typesize": itemsize,
            "cname": "zstd" if blosc else "lz4",
            "clevel": level,
            "shuffle": "shuffle" if blosc else "bitshuffle",
            "blocksize": BLOSC_BLOCKSIZE,
        }
        out.append({"name": "blosc", "configuration": conf})
    elif name == "zstd":
        out.append({"name": "zstd", "configuration": {"level": level, "checksum": False}})
    elif name == "gzip":
        out.append({"name": "gzip", "configuration": {"level": level}})
    return out


def codec_from_v2(cfg: Any) -> Any:
    """The numcodecs codec of a stored v2 ``compressor``, or ``None`` when actfmt does not decode it itself."""
    if not isinstance(cfg, dict) or cfg.get("id") not in _V2_DIRECT:
        return None
    try:
        return _numcodecs().get_codec(dict(cfg))
    except (TypeError, ValueError, KeyError):
        return None


def codec_from_v3(cfg: Any) -> Any:
    """The numcodecs codec of one stored v3 compressor, or ``None`` when actfmt does not decode it itself."""
    if not isinstance(cfg, dict):
        return None
    name, conf = cfg.get("name"), cfg.get("configuration") or {}
    if not isinstance(conf, dict):
        return None
    if name == "blosc":
        shuffle = _SHUFFLE_IDS.get(conf.get("shuffle", "noshuffle"))
        if shuffle is None:
            return None
        spec: dict[str, Any] = {
            "id": "blosc",
            "cname": conf.get("cname", "zstd"),
            "clevel": conf.get("clevel", 5),
            "shuffle": shuffle,
            "blocksize": conf.get("blocksize", 0),
        }
    elif name == "zstd":
        spec = {"id": "zstd", "level": conf.get("level", 0), "checksum": bool(conf.get("checksum", False))}
    elif name == "gzip":
        spec = {"id": "gzip", "level": conf.get("level", 5)}
    else:
        return None
    try:
        return _numcodecs().get_codec(spec)
    except (TypeError, ValueError, KeyError):
        return None


def codec_name(codec: Any) -> str:
    """``none``, ``blosc-zstd level 1 (shuffle)``, ``zstd level 1``, ``gzip level 1`` ..."""
    if codec is None:
        return "none"
    cfg = codec.get_config()
    if cfg["id"] == "blosc":
        shuffle = _SHUFFLE_NAMES.get(cfg.get("shuffle"), "?")  # type: ignore[arg-type]
        return f"blosc-{cfg['cname']} level {cfg['clevel']} ({shuffle})"
    lvl = cfg.get("level")
    return str(cfg["id"]) if lvl is None else f"{cfg['id']} level {lvl}"


class InflationError(ValueError):
    """A chunk that decodes (or says it decodes) to more bytes than its declared chunk shape holds."""


def _zstd_content_size(raw: Any) -> int | None:
    """The content size a zstd frame header declares, ``None`` when it declares none (or is no frame)."""
    head = bytes(raw[:18])
    if len(head) < 6 or head[:4] != b"\x28\xb5\x2f\xfd":
        return None
    fhd = head[4]
    fcs_flag, single, did_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[did_flag]
    size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if size == 0 or len(head) < pos + size:
        return None
    value = int.from_bytes(head[pos : pos + size], "little")
    return value + 256 if size == 2 else value


def decode_into(codec: Any, raw: Any, out: Any) -> None:
    """Decode one chunk into ``out`` (a whole chunk), never producing more than ``out.nbytes`` bytes: the size a
    compressed chunk declares (blosc, zstd, lz4 headers) is checked before decoding, and gzip / zlib inflate
    at most one byte beyond it.  An :class:`InflationError` when the chunk holds more (a decompression bomb or
    a damaged chunk), ``ValueError`` / codec errors when it does not decode."""
    want = out.nbytes
    cfg = codec.get_config()
    cid = cfg.get("id")
    declared: int | None = None
    if cid == "blosc":
        if len(raw) < 16:
            raise ValueError("a blosc chunk shorter than its 16-byte header")
        declared = struct.unpack_from("<I", bytes(raw[:16]), 4)[0]
    elif cid == "zstd":
        declared = _zstd_content_size(raw)
        if declared is None:
            raise InflationError(
                "the zstd frame declares no content size (refused: it could inflate unbounded)"
            )
    elif cid == "lz4":
        if len(raw) < 4:
            raise ValueError("an lz4 chunk shorter than its 4-byte header")
        declared = struct.unpack_from("<I", bytes(raw[:4]), 0)[0]
    elif cid in ("gzip", "zlib"):
        d = isal_zlib.decompressobj(31 if cid == "gzip" else 15)
        data = d.decompress(bytes(raw), want + 1)
        if len(data) > want or d.unconsumed_tail:
            raise InflationError(f"it inflates to more than the {want} bytes of its chunk shape")
        if len(data) != want:
            raise ValueError(f"it inflates to {len(data)} bytes, not {want}")
        memoryview(out).cast("B")[:] = data
        return
    else:  # pragma: no cover - the codec whitelist of meta.py admits nothing else here
        raise ValueError(f"codec {cid!r} is not decoded by actfmt")
    if declared != want:
        if declared > want:
            raise InflationError(
                f"it declares {declared} decoded bytes, more than the {want} of its chunk shape"
            )
        raise ValueError(f"it declares {declared} decoded bytes, not {want}")
    codec.decode(raw, out=out)


def check_decoded_size(codec: Any, raw: Any, limit: int) -> None:
    """An :class:`InflationError` when chunk ``raw`` decodes (or says it decodes) to more than ``limit`` bytes:
    checked before another decoder (zarr-python's) would allocate for it.  Chunks that do not decode are left
    to that decoder to report."""
    cid = codec.get_config().get("id")
    declared: int | None = None
    if cid == "blosc" and len(raw) >= 16:
        declared = struct.unpack_from("<I", bytes(raw[:16]), 4)[0]
    elif cid == "lz4" and len(raw) >= 4:
        declared = struct.unpack_from("<I", bytes(raw[:4]), 0)[0]
    elif cid == "zstd":
        declared = _zstd_content_size(raw)
        if declared is None:
            raise InflationError(
                "the zstd frame declares no content size (refused: it could inflate unbounded)"
            )
    elif cid in ("gzip", "zlib"):
        d = isal_zlib.decompressobj(31 if cid == "gzip" else 15)
        try:
            data = d.decompress(bytes(raw), limit + 1)
        except Exception:  # not a deflate stream: the decoder says so
            return
        if len(data) > limit or d.unconsumed_tail:
            raise InflationError(f"it inflates to more than the {limit} bytes of its chunk shape")
        return
    if declared is not None and declared > limit:
        raise InflationError(
            f"it declares {declared} decoded bytes, more than the {limit} of its chunk shape"
        )
