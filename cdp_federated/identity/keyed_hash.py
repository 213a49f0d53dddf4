"""Keyed salted hashing: HMAC-SHA256 tokens of normalised identifiers, vectorised.

For matching inside one organisation (or between parties that trust each other with the key):
every party holding the federation secret derives the same per-job key and tokenises its
normalised identifiers; equal identifiers give equal 32-byte tokens, and only tokens travel.

Construction (``docs/identity.md`` has the security argument)::

    key    = HKDF-SHA256(ikm=federation_secret, salt=None, length=32,
                         info=b"cdp-fl salted-hash v1|" + utf8(job_id))
    key_id = hex(SHA-256(key)[:8])
    token  = HMAC-SHA256(key=ascii(hex(key)), msg=utf8(normalised identifier))

The HMAC key is the derived key written as 64 lowercase hex characters (still 256 bits of
entropy, exactly one SHA-256 block): that is the form the vectorised HMAC of the ``polars-hash``
plugin accepts, and :func:`hmac_token` reproduces it with the standard library for checking.

**Limit.** Whoever holds the key can tokenise a dictionary of likely identifiers (emails are
guessable) and so recover every identifier it matches. Keyed hashing hides identifiers from
parties *without* the key only; across organisations use private set intersection instead.
"""

from __future__ import annotations

import binascii
import dataclasses
import hashlib
import hmac
import secrets

import numpy as np
import polars as pl
import polars_hash as plh
import pyarrow as pa
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import ConfigError, IdentifierError, ProtocolError

__all__ = [
    "HKDF_INFO_PREFIX",
    "TOKEN_BYTES",
    "DerivedKey",
    "KeyedTokens",
    "new_federation_secret",
    "derive_key",
    "hmac_tokens",
    "hmac_token",
    "keyed_tokens",
    "intersect_tokens",
]

HKDF_INFO_PREFIX = b"cdp-fl salted-hash v1|"
KEY_BYTES = 32
TOKEN_BYTES = 32
MIN_SECRET_BYTES = 16
# Rows per chunk handed to the HMAC plugin: chunks run on polars' thread pool in parallel.
_MIN_CHUNK_ROWS = 65_536


@dataclasses.dataclass(frozen=True)
class DerivedKey:
    """A per-job HMAC key and its public identifier (the key never appears in ``repr``)."""

    key: bytes = dataclasses.field(repr=False)
    key_id: str

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise ConfigError(
                f"a derived key has {KEY_BYTES} bytes",
                field="key",
                value=len(self.key),
                fix="build keys with derive_key()",
            )


@dataclasses.dataclass(frozen=True, eq=False)
class KeyedTokens:
    """Tokens (``(n, 32)`` uint8) together with the id of the key that made them."""

    key_id: str
    tokens: np.ndarray


def new_federation_secret() -> bytes:
    """32 bytes from the operating system's CSPRNG: the secret a federation shares."""
    return secrets.token_bytes(KEY_BYTES)


def _key_id(key: bytes) -> str:
    return hashlib.sha256(key).digest()[:8].hex()


def derive_key(federation_secret: bytes, job_id: str) -> DerivedKey:
    """The job's HMAC key: HKDF-SHA256 of the federation secret, bound to ``job_id``.

    Deterministic (every holder of the secret derives the same key for a job), separated per job
    (tokens of one job cannot be joined with another's), and rotated by changing the secret or
    the job id: the new key has a new ``key_id``.
    """
    if not isinstance(federation_secret, bytes | bytearray) or (
        len(federation_secret) < MIN_SECRET_BYTES
    ):
        size = len(federation_secret) if isinstance(federation_secret, bytes | bytearray) else None
        raise ConfigError(
            f"the federation secret must be at least {MIN_SECRET_BYTES} random bytes",
            field="federation_secret",
            value=size,
            fix="create one with new_federation_secret()",
        )
    if not isinstance(job_id, str) or not job_id:
        raise ConfigError(
            "a job id is required to derive the salted-hash key",
            field="job_id",
            value=job_id,
            fix="pass the job's id",
        )
    key = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_BYTES,
        salt=None,
        info=HKDF_INFO_PREFIX + job_id.encode("utf-8"),
    ).derive(bytes(federation_secret))
    return DerivedKey(key=key, key_id=_key_id(key))


def hmac_token(value: str, key: DerivedKey) -> bytes:
    """One token with the standard library: the reference the vectorised path must equal."""
    return hmac.new(key.key.hex().encode("ascii"), value.encode("utf-8"), hashlib.sha256).digest()


def _hex_to_tokens(hex_column: pl.Series, out: np.ndarray) -> None:
    """Decode a column of 64-character hex digests into ``out`` (n, 32), chunk by chunk."""
    row = 0
    for chunk in hex_column.get_chunks():
        array = chunk.to_arrow()
        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks()
        if array.type not in (pa.string(), pa.large_string()):
            array = array.cast(pa.large_string())
        n = len(array)
        if n == 0:
            continue
        offset_type = np.int64 if array.type == pa.large_string() else np.int32
        _, offsets_buf, data_buf = array.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=offset_type)[array.offset : array.offset + n + 1]
        start, end = int(offsets[0]), int(offsets[-1])
        if end - start != n * 2 * TOKEN_BYTES:  # never expected: the plugin emits fixed-width hex
            raise IdentifierError("HMAC output is not 64 hex characters per row", field="tokens")
        raw = binascii.a2b_hex(memoryview(data_buf)[start:end])
        out[row : row + n] = np.frombuffer(raw, dtype=np.uint8).reshape(n, TOKEN_BYTES)
        row += n


def hmac_tokens(values: pl.Series, key: DerivedKey) -> np.ndarray:
    """HMAC-SHA256 tokens of normalised identifiers: a ``(len(values), 32)`` uint8 array.

    Runs in the ``polars-hash`` plugin (Rust) on polars' thread pool; no Python call per row.
    Nulls are refused (an invalid identifier must never become a token that could match):
    pass ``NormalizedIds.values.drop_nulls()``.
    """
    if values.dtype != pl.String:
        raise IdentifierError(
            f"tokens are made from normalised strings, not {values.dtype}",
            field="values",
            value=str(values.dtype),
            fix="pass NormalizedIds.values",
        )
    nulls = values.null_count()
    if nulls:
        raise IdentifierError(
            "cannot tokenise missing or invalid identifiers",
            field="values",
            value=nulls,
            fix="drop the nulls first: normalized.values.drop_nulls()",
        )
    n = len(values)
    out = np.empty((n, TOKEN_BYTES), dtype=np.uint8)
    if n == 0:
        return out
    parts = max(1, min(pl.thread_pool_size(), n // _MIN_CHUNK_ROWS))
    step = -(-n // parts)
    frame = pl.concat(
        [values.slice(i, step).to_frame("v") for i in range(0, n, step)], rechunk=False
    )
    hexed = frame.select(plh.col("v").chash.hmac_sha256(key=key.key.hex())).to_series()
    _hex_to_tokens(hexed, out)
    return out


def keyed_tokens(values: pl.Series, key: DerivedKey) -> KeyedTokens:
    """:func:`hmac_tokens` labelled with the key id, ready to compare or send."""
    return KeyedTokens(key_id=key.key_id, tokens=hmac_tokens(values, key))


def _check_tokens(tokens: np.ndarray, field: str) -> np.ndarray:
    array = np.ascontiguousarray(tokens)
    if array.dtype != np.uint8 or array.ndim != 2 or array.shape[1] != TOKEN_BYTES:
        raise ProtocolError(
            f"tokens must be a (n, {TOKEN_BYTES}) uint8 array",
            field=field,
            value=f"{array.dtype}{list(array.shape)}",
            fix="make tokens with hmac_tokens()",
        )
    return array


def intersect_tokens(left: KeyedTokens, right: KeyedTokens) -> tuple[np.ndarray, np.ndarray]:
    """Row indices ``(i, j)`` with ``left.tokens[i] == right.tokens[j]``, as two int64 arrays.

    Refuses tokens made under different keys (a rotated key or another job): they would never
    match and the empty result would look like "no overlap". Joins on the first 8 bytes with
    polars, then checks the other 24 bytes, so the result is exact.
    """
    if left.key_id != right.key_id:
        raise ProtocolError(
            "tokens were made with different keys",
            field="key_id",
            value=f"{left.key_id} != {right.key_id}",
            fix="tokenise both sides with the same derived key (same federation secret and job)",
        )
    a = _check_tokens(left.tokens, "left.tokens").view("<u8")
    b = _check_tokens(right.tokens, "right.tokens").view("<u8")

    def frame(words: np.ndarray, prefix: str) -> pl.DataFrame:
        columns = {f"{prefix}{k}": words[:, k] for k in range(1, 4)}
        return pl.DataFrame(
            {"k": words[:, 0], f"{prefix}i": np.arange(len(words), dtype=np.int64), **columns}
        )

    joined = frame(a, "l").join(frame(b, "r"), on="k", how="inner", maintain_order="left")
    same = pl.all_horizontal(pl.col(f"l{k}") == pl.col(f"r{k}") for k in range(1, 4))
    matched = joined.filter(same).sort("li", "ri")
    return matched["li"].to_numpy(), matched["ri"].to_numpy()
