"""Binary message codec: a JSON header for scalars plus raw little-endian array buffers. No pickle.

Frame layout::

    b"CDPF" | u16 format version | u32 header length | header (UTF-8 JSON) | array buffers

The header is ``{"type", "version", "fields": {scalar: value}, "arrays": [{"name", "dtype",
"shape", "offset", "length"}]}``. Buffers are concatenated in header order with no gaps, and the
frame ends exactly where the last buffer does. Only the dtypes in :data:`ALLOWED_DTYPES` travel.

Decoding trusts nothing: every malformed, oversized or inconsistent frame raises
:class:`~cdp_federated.errors.CodecError` (never another exception type), float arrays must be
finite, and arrays come back as fresh, aligned, **read-only copies** in native byte order, so a
decoded message neither aliases the frame nor can be mutated behind its frozen dataclass.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import CodecError
from .messages import MESSAGE_TYPES, Message

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "ALLOWED_DTYPES",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_ELEMENTS",
    "Codec",
    "encode",
    "decode",
]

MAGIC = b"CDPF"
FORMAT_VERSION = 1
ALLOWED_DTYPES = ("float32", "float64", "int32", "int64", "uint8", "uint32", "uint64", "bool")
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_ELEMENTS = 8_000_000
# Wire dtype name -> little-endian dtype, and native dtypes -> wire name: dict lookups instead of
# ``dtype.name`` (slow pure-Python code in numpy) and a fresh ``newbyteorder`` per array.
_WIRE_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in ALLOWED_DTYPES}
_NAME_OF = {np.dtype(name).newbyteorder(order): name for name in ALLOWED_DTYPES for order in "<>="}
_NATIVE = {name: np.dtype(name) for name in ALLOWED_DTYPES}
_PREFIX = struct.Struct("<4sHI")
_MAX_NDIM = 32
_HEADER_KEYS = {"type", "version", "fields", "arrays"}
_ARRAY_KEYS = {"name", "dtype", "shape", "offset", "length"}


def _fail(message: str, field: str, value: Any = None, fix: str | None = None) -> CodecError:
    return CodecError(
        message, field=field, value=value, fix=fix or "send frames made by this codec"
    )


def _is_int(value: Any) -> bool:
    return type(value) is int or (isinstance(value, int) and not isinstance(value, bool))


# Scalar kind -> check. Exact type first: these run for every scalar of every message.
_SCALAR_OK = {
    "int": _is_int,
    "float": lambda v: type(v) is float or isinstance(v, float) or _is_int(v),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "dict": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
}


def _check_scalar(cls: type[Message], name: str, kind: str, value: Any) -> Any:
    if not _SCALAR_OK[kind](value):
        raise _fail(
            f"{cls.TYPE}.{name} must be {kind}, got {type(value).__name__}",
            f"{cls.TYPE}.{name}",
            value,
        )
    return float(value) if kind == "float" and type(value) is not float else value


def _all_finite(array: np.ndarray) -> bool:
    """Whether a float array holds no NaN or Inf. ``isfinite(...).all()`` is vectorised and
    took about 1 us for a model-sized array here, less than a sum (measured): kept as it is."""
    return not array.size or bool(np.isfinite(array).all())


def _check_array(cls: type[Message], name: str, array: np.ndarray) -> None:
    dtype = array.dtype
    if dtype not in _NAME_OF:
        raise _fail(
            f"dtype {dtype.str} is not allowed on the wire",
            f"{cls.TYPE}.{name}",
            dtype.str,
            f"use one of {', '.join(ALLOWED_DTYPES)}",
        )
    kind = dtype.kind
    if kind not in cls.ARRAYS[name]:
        field = f"{cls.TYPE}.{name}"
        raise _fail(f"{field} does not accept dtype {dtype.name}", field, dtype.name)
    if kind == "f" and not _all_finite(array):  # a security check: no poisoned models
        field = f"{cls.TYPE}.{name}"
        raise _fail(
            f"{field} contains NaN or Inf",
            field,
            int(np.size(array) - np.isfinite(array).sum()),
            "a participant must send finite values only; check its data and training settings",
        )


_FIELDS: dict[type, tuple[tuple[str, str | None], ...]] = {}
_ARRAY_NAMES: dict[type, list[str]] = {}


def _array_names(cls: type[Message]) -> list[str]:
    names = _ARRAY_NAMES.get(cls)
    if names is None:
        names = _ARRAY_NAMES[cls] = sorted(cls.ARRAYS)
    return names


def _fields(cls: type[Message]) -> tuple[tuple[str, str | None], ...]:
    """``(name, scalar kind or None for an array)`` per field, in order; computed once a class."""
    plan = _FIELDS.get(cls)
    if plan is None:
        plan = tuple((f.name, cls.SCALARS.get(f.name)) for f in dataclasses.fields(cls))  # type: ignore[arg-type]
        _FIELDS[cls] = plan
    return plan


def _no_constants(token: str) -> Any:
    raise ValueError(f"{token} is not allowed")


# One encoder and decoder for every frame (json.dumps/loads with options build new ones a call).
_JSON_OUT = json.JSONEncoder(allow_nan=False, separators=(",", ":"))
_JSON_IN = json.JSONDecoder(parse_constant=_no_constants)


class Codec:
    """Encoder/decoder with size limits. ``types`` restricts the accepted message types (default:
    every registered type), so an endpoint can refuse messages it has no business receiving."""

    def __init__(
        self,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
        types: Mapping[str, type[Message]] | None = None,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_elements = max_elements
        self.types = dict(MESSAGE_TYPES if types is None else types)

    # --- encode ----------------------------------------------------------------------------------

    def encode(self, message: Message) -> bytes:
        """Frame ``message``; refuses unregistered types, bad scalars, dtypes and non-finite floats."""
        cls = type(message)
        if self.types.get(getattr(cls, "TYPE", None)) is not cls:
            raise _fail(f"{cls.__name__} is not a registered message type", "type", cls.__name__)
        fields: dict[str, Any] = {}
        specs: list[dict[str, Any]] = []
        buffers: list[bytes] = []
        offset = elements = 0
        for name, kind in _fields(cls):
            value = getattr(message, name)
            if kind is not None:
                fields[name] = _check_scalar(cls, name, kind, value)
                continue
            array = np.asarray(value)
            _check_array(cls, name, array)
            wire_name = _NAME_OF[array.dtype]
            raw = np.ascontiguousarray(array, dtype=_WIRE_DTYPES[wire_name]).tobytes()
            specs.append(
                {
                    "name": name,
                    "dtype": wire_name,
                    "shape": list(array.shape),
                    "offset": offset,
                    "length": len(raw),
                }
            )
            buffers.append(raw)
            offset += len(raw)
            elements += array.size
        if elements > self.max_elements:
            raise _fail("message has too many array elements", "arrays", elements)
        header = {"type": cls.TYPE, "version": cls.VERSION, "fields": fields, "arrays": specs}
        try:
            head = _JSON_OUT.encode(header).encode()
        except (TypeError, ValueError) as exc:  # NaN scalars, numpy ints, sets, objects...
            raise _fail(
                f"{cls.TYPE} has a scalar that is not plain finite JSON: {exc}",
                "fields",
                fix="send only str/int/float/bool/list/dict scalars with finite numbers",
            ) from exc
        frame = b"".join([_PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)), head, *buffers])
        if len(frame) > self.max_bytes:
            raise _fail(
                "message exceeds the maximum size",
                "size",
                len(frame),
                f"keep messages under {self.max_bytes} bytes",
            )
        return frame

    # --- decode ----------------------------------------------------------------------------------

    def decode(self, data: bytes | bytearray | memoryview) -> Message:
        """Parse and validate a frame; any defect is a :class:`CodecError`."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise _fail("frame must be bytes", "frame", type(data).__name__)
        data = bytes(data)
        try:
            return self._decode(data)
        except CodecError:
            raise
        except Exception as exc:  # noqa: BLE001 - the contract is "CodecError, never another type"
            raise _fail(f"malformed frame: {exc!r}", "frame") from exc

    def _decode(self, data: bytes) -> Message:
        if len(data) > self.max_bytes:
            raise _fail("message exceeds the maximum size", "size", len(data))
        if len(data) < _PREFIX.size:
            raise _fail("frame is truncated", "frame", len(data))
        magic, version, head_len = _PREFIX.unpack_from(data)
        if magic != MAGIC:
            raise _fail("not a cdp-federated frame (bad magic)", "magic", magic)
        if version != FORMAT_VERSION:
            raise _fail(
                "unsupported frame format version",
                "format_version",
                version,
                f"this release reads format version {FORMAT_VERSION}",
            )
        if head_len > len(data) - _PREFIX.size:
            raise _fail("frame is truncated inside the header", "header_length", head_len)
        header = self._parse_header(data[_PREFIX.size : _PREFIX.size + head_len])
        payload = memoryview(data)[_PREFIX.size + head_len :]
        cls = self._message_class(header)
        kwargs = self._scalars(cls, header["fields"])
        kwargs.update(self._arrays(cls, header["arrays"], payload))
        return cls(**kwargs)

    @staticmethod
    def _parse_header(raw: bytes) -> dict[str, Any]:
        try:
            header = _JSON_IN.decode(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise _fail(f"header is not valid JSON: {exc}", "header") from exc
        if not isinstance(header, dict) or set(header) != _HEADER_KEYS:
            keys = sorted(header) if isinstance(header, dict) else type(header).__name__
            raise _fail("header must hold exactly type, version, fields, arrays", "header", keys)
        if not isinstance(header["fields"], dict) or not isinstance(header["arrays"], list):
            raise _fail("header fields must be an object and arrays a list", "header")
        return header

    def _message_class(self, header: dict[str, Any]) -> type[Message]:
        name = header["type"]
        cls = self.types.get(name) if isinstance(name, str) else None
        if cls is None:
            raise _fail(
                "unknown message type",
                "type",
                name,
                f"expected one of {', '.join(sorted(self.types))}",
            )
        if header["version"] != cls.VERSION or not _is_int(header["version"]):
            raise _fail(
                f"unsupported {name} version",
                "version",
                header["version"],
                f"this release speaks {name} version {cls.VERSION}",
            )
        return cls

    @staticmethod
    def _scalars(cls: type[Message], fields: dict[str, Any]) -> dict[str, Any]:
        if fields.keys() != cls.SCALARS.keys():
            raise _fail(
                f"{cls.TYPE} fields do not match its schema",
                "fields",
                sorted(set(fields) ^ set(cls.SCALARS)),
            )
        return {name: _check_scalar(cls, name, cls.SCALARS[name], v) for name, v in fields.items()}

    def _arrays(
        self, cls: type[Message], specs: list[Any], payload: memoryview
    ) -> dict[str, np.ndarray]:
        names = [s.get("name") if isinstance(s, dict) else None for s in specs]
        if sorted(map(str, names)) != _array_names(cls):
            raise _fail(f"{cls.TYPE} arrays do not match its schema", "arrays", names)
        out: dict[str, np.ndarray] = {}
        offset = elements = 0
        for spec in specs:
            if spec.keys() != _ARRAY_KEYS:
                raise _fail("array entry has wrong keys", "arrays", sorted(spec))
            name, dtype_name, shape = spec["name"], spec["dtype"], spec["shape"]
            dtype = _WIRE_DTYPES.get(dtype_name) if type(dtype_name) is str else None
            if dtype is None:
                raise _fail(
                    "dtype is not allowed on the wire",
                    f"{cls.TYPE}.{name}",
                    dtype_name,
                    f"use one of {', '.join(ALLOWED_DTYPES)}",
                )
            # JSON gives exact ints (never a bool) for integers, so ``type(n) is int`` suffices.
            if (
                type(shape) is not list
                or len(shape) > _MAX_NDIM
                or not all(type(n) is int and n >= 0 for n in shape)
            ):
                field = f"{cls.TYPE}.{name}"
                raise _fail("array shape must be a list of non-negative ints", field, shape)
            size = math.prod(shape)
            elements += size
            if elements > self.max_elements:
                raise _fail("message has too many array elements", f"{cls.TYPE}.{name}", elements)
            nbytes = size * dtype.itemsize
            start, length = spec["offset"], spec["length"]
            if (
                type(start) is not int
                or type(length) is not int
                or (start, length)
                != (
                    offset,
                    nbytes,
                )
            ):
                raise _fail(
                    "array offset/length do not match its shape and position",
                    f"{cls.TYPE}.{name}",
                    {"offset": start, "length": length},
                )
            if offset + nbytes > len(payload):
                field = f"{cls.TYPE}.{name}"
                raise _fail("frame is truncated inside an array", field, len(payload))
            raw = payload[offset : offset + nbytes]
            offset += nbytes
            if dtype.kind == "b" and size and np.frombuffer(raw, dtype=np.uint8).max() > 1:
                raise _fail("bool array holds bytes other than 0 and 1", f"{cls.TYPE}.{name}")
            # A fresh, aligned copy in native order that aliases nothing of the frame.
            array = np.frombuffer(raw, dtype=dtype).reshape(shape).astype(_NATIVE[dtype_name])
            _check_array(cls, name, array)
            array.setflags(write=False)
            out[name] = array
        if offset != len(payload):
            raise _fail(
                "frame has trailing bytes after the last array", "frame", len(payload) - offset
            )
        return out


DEFAULT_CODEC = Codec()


def encode(message: Message) -> bytes:
    """Encode with the default limits (see :class:`Codec`)."""
    return DEFAULT_CODEC.encode(message)


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Decode with the default limits (see :class:`Codec`)."""
    return DEFAULT_CODEC.decode(data)
