"""Coordinator tokens: Ed25519 signing keys with rotation, a JWKS, issuing and verifying JWTs.

The coordinator signs short-lived access tokens (EdDSA over Ed25519, RFC 8037) with the current
key of a :class:`KeyRing`. Rotating makes a new current key and keeps the previous one verifiable
for an overlap window, so tokens issued just before a rotation stay good until they expire; the
JWKS (RFC 7517) lists every key still valid.

:class:`TokenVerifier` checks, in this order, and stops at the first failure (each one an
:class:`~cdp_federated.errors.AuthError` with its ``code``):

1. the compact form (three canonical base64url segments, a JSON object header without duplicate
   names) -- ``malformed``;
2. ``alg`` is exactly ``EdDSA`` before anything is decoded (so ``none`` and HS256-with-the-public-
   key never reach a key) -- ``bad_algorithm``; no ``crit`` (we support no extension) --
   ``unsupported_crit``; no header parameter but ``alg``, ``kid``, ``typ`` -- ``bad_header``;
3. the key named by ``kid`` (never "try every key") -- ``unknown_kid``; the signature, with pyjwt
   pinned to ``algorithms=["EdDSA"]`` -- ``bad_signature``;
4. the claims: ``exp``, ``iat``, ``iss``, ``aud``, ``sub``, ``jti``, ``role`` present --
   ``missing_claim``; well typed -- ``bad_claim``; ``iss`` equal to the issuer (a prefix or
   substring is not equal) -- ``wrong_issuer``; ``aud`` -- ``wrong_audience``; ``exp`` --
   ``expired``; ``nbf`` and ``iat`` not in the future -- ``not_yet_valid`` (all with ``leeway``);
5. the subject is still active (``is_active``) -- ``disabled``;
6. last, one-time tokens (``one_time: true``) through the replay cache -- ``replayed``. Nothing is
   recorded for a token that failed an earlier check.

Time comes from ``now=`` arguments or the verifier's ``clock`` (never pyjwt's own clock).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from ..errors import AuthError, ConfigError
from ..keyfiles import check_private_mode, write_private
from .authz import ROLES

__all__ = [
    "ALGORITHM",
    "DEFAULT_TTL",
    "MAX_TTL",
    "DEFAULT_OVERLAP",
    "DEFAULT_LEEWAY",
    "Claims",
    "KeyRing",
    "SigningKey",
    "ReplayCache",
    "MemoryReplayCache",
    "TokenVerifier",
    "issue_token",
    "kid_of",
    "public_jwk",
    "keys_from_jwks",
    "utcnow",
    "as_utc",
]

ALGORITHM = "EdDSA"
DEFAULT_TTL = timedelta(minutes=15)
MAX_TTL = timedelta(hours=24)  # access tokens are short-lived: issue_token refuses longer
DEFAULT_OVERLAP = timedelta(hours=1)  # must exceed the longest TTL in use
DEFAULT_LEEWAY = timedelta(seconds=30)
MAX_TOKEN_CHARS = 8192
MAX_ID_CHARS = 128  # sub and jti (the replay cache's key column)

REQUIRED_CLAIMS = ("exp", "iat", "iss", "aud", "sub", "jti", "role")
_REGISTERED = frozenset({*REQUIRED_CLAIMS, "nbf", "one_time"})
_HEADER_PARAMS = frozenset({"alg", "kid", "typ"})
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_KID = re.compile(r"[A-Za-z0-9_-]{11}")  # kid_of: 8 bytes -> 11 base64url characters
_MANIFEST = "keyring.json"
_MANIFEST_VERSION = 1


# --- time ----------------------------------------------------------------------------------------


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (the default clock)."""
    return datetime.now(UTC)


def as_utc(value: datetime, *, name: str = "now") -> datetime:
    """``value`` in UTC; a naive datetime is refused (it would be read as local time)."""
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise ConfigError(
            f"{name} must be a timezone-aware datetime",
            field=name,
            value=value,
            fix="pass datetime.now(UTC) or another aware datetime",
        )
    return value.astimezone(UTC)


def _moment(now: datetime | None) -> datetime:
    return utcnow() if now is None else as_utc(now)


# --- encoding ------------------------------------------------------------------------------------


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    """Strict base64url without padding: another spelling of the same bytes is refused."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64encode(data) != text:
        raise ValueError("non-canonical base64url")
    return data


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError("duplicate member name")
        out[key] = value
    return out


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except RecursionError:  # deeply nested arrays: not a header we wrote
        raise ValueError("nested too deeply") from None
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


# --- keys ----------------------------------------------------------------------------------------


def _raw_public(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def kid_of(public_key: Ed25519PublicKey) -> str:
    """base64url of the first 8 bytes of SHA-256 of the raw 32-byte public key (11 characters)."""
    return _b64encode(hashlib.sha256(_raw_public(public_key)).digest()[:8])


def public_jwk(public_key: Ed25519PublicKey, kid: str | None = None) -> dict[str, str]:
    """The RFC 8037 JWK of an Ed25519 public key."""
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": _b64encode(_raw_public(public_key)),
        "kid": kid or kid_of(public_key),
        "alg": ALGORITHM,
        "use": "sig",
    }


def keys_from_jwks(jwks: Mapping[str, Any]) -> dict[str, Ed25519PublicKey]:
    """``kid -> public key`` for every Ed25519 signing key in a JWKS. Keys of other types or uses
    are skipped; a malformed Ed25519 entry is a :class:`ConfigError`."""
    entries = jwks.get("keys") if isinstance(jwks, Mapping) else None
    if not isinstance(entries, list):
        raise ConfigError(
            "a JWKS is an object with a 'keys' list",
            field="jwks",
            fix="pass the JSON the coordinator's JWKS endpoint serves",
        )
    out: dict[str, Ed25519PublicKey] = {}
    for entry in entries:
        if not isinstance(entry, Mapping) or entry.get("kty") != "OKP":
            continue
        if entry.get("crv") != "Ed25519" or entry.get("use", "sig") != "sig":
            continue
        if entry.get("alg", ALGORITHM) != ALGORITHM:
            continue
        kid, x = entry.get("kid"), entry.get("x")
        try:
            if not isinstance(kid, str) or not kid or not isinstance(x, str):
                raise ValueError("kid and x are required strings")
            raw = _b64decode(x)
            key = Ed25519PublicKey.from_public_bytes(raw)
        except ValueError as exc:
            raise ConfigError(
                f"malformed Ed25519 key in JWKS: {exc}",
                field="jwks",
                value=kid if isinstance(kid, str) else None,
                fix="pass the JSON the coordinator's JWKS endpoint serves",
            ) from None
        if kid in out:
            raise ConfigError(
                "duplicate kid in JWKS", field="jwks", value=kid, fix="give every key its own kid"
            )
        out[kid] = key
    return out


@dataclass(frozen=True)
class SigningKey:
    """One Ed25519 key of a :class:`KeyRing`. ``retires_at`` is None for the current (signing)
    key; a previous key verifies until ``retires_at``."""

    kid: str
    private_key: Ed25519PrivateKey = field(repr=False)
    created_at: datetime
    retires_at: datetime | None = None

    @classmethod
    def generate(cls, now: datetime) -> SigningKey:
        private = Ed25519PrivateKey.generate()
        return cls(kid_of(private.public_key()), private, now)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    def valid_at(self, now: datetime) -> bool:
        return self.retires_at is None or now < self.retires_at

    def jwk(self) -> dict[str, str]:
        return public_jwk(self.public_key, self.kid)


def _keyring_error(message: str, path: Path, fix: str) -> ConfigError:
    return ConfigError(message, field="keyring", value=str(path), fix=fix)


def _check_private_mode(path: Path) -> None:
    check_private_mode(
        path,
        lambda message, value, fix: ConfigError(
            f"coordinator signing key: {message}", field="keyring", value=value, fix=fix
        ),
    )


def _write_private(path: Path, data: bytes) -> None:
    write_private(path, data)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = (path / _MANIFEST).stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class KeyRing:
    """The coordinator's signing keys: ``keys[0]`` is current, the rest are previous keys that
    still verify until their ``retires_at``.

    With a ``path`` the ring lives in that directory (mode 0700): one PKCS#8 PEM per key,
    ``<kid>.pem`` (mode 0600; loading refuses a key file group or others may read), and
    ``keyring.json`` naming the current key and when each previous one retires. :meth:`rotate`
    saves; :meth:`refresh` picks up a rotation another process saved.
    """

    def __init__(
        self,
        keys: Sequence[SigningKey],
        *,
        overlap: timedelta = DEFAULT_OVERLAP,
        path: str | os.PathLike[str] | None = None,
    ) -> None:
        if not keys or keys[0].retires_at is not None:
            raise ConfigError(
                "a key ring needs a current key (the first, without retires_at)",
                field="keyring",
                fix="use KeyRing.generate() or KeyRing.load(path)",
            )
        if overlap <= timedelta(0):
            raise ConfigError(
                "the rotation overlap must be positive",
                field="overlap",
                value=str(overlap),
                fix=f"use at least the longest token TTL (default {DEFAULT_OVERLAP})",
            )
        self._keys: tuple[SigningKey, ...] = tuple(keys)
        self.overlap = overlap
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None

    # construction -------------------------------------------------------------------------------

    @classmethod
    def generate(
        cls,
        *,
        now: datetime | None = None,
        overlap: timedelta = DEFAULT_OVERLAP,
        path: str | os.PathLike[str] | None = None,
    ) -> KeyRing:
        """A ring with one fresh key (saved when ``path`` is given)."""
        ring = cls([SigningKey.generate(_moment(now))], overlap=overlap, path=path)
        if ring.path is not None:
            ring.save()
        return ring

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, overlap: timedelta = DEFAULT_OVERLAP) -> KeyRing:
        """The ring saved in ``path``."""
        return cls._read(Path(path), overlap)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        now: datetime | None = None,
        overlap: timedelta = DEFAULT_OVERLAP,
    ) -> KeyRing:
        """The ring saved in ``path``, or a new one created there (a coordinator's first start)."""
        target = Path(path)
        if (target / _MANIFEST).exists():
            return cls.load(target, overlap=overlap)
        return cls.generate(now=now, overlap=overlap, path=target)

    # reading ------------------------------------------------------------------------------------

    @property
    def current(self) -> SigningKey:
        return self._keys[0]

    @property
    def keys(self) -> tuple[SigningKey, ...]:
        return self._keys

    def valid_keys(self, now: datetime | None = None) -> tuple[SigningKey, ...]:
        moment = _moment(now)
        return tuple(key for key in self._keys if key.valid_at(moment))

    def public_key(self, kid: str, now: datetime | None = None) -> Ed25519PublicKey | None:
        """The public key named ``kid`` if it still verifies at ``now``, else None."""
        moment = _moment(now)
        for key in self._keys:
            if key.kid == kid:
                return key.public_key if key.valid_at(moment) else None
        return None

    def jwks(self, now: datetime | None = None) -> dict[str, list[dict[str, str]]]:
        """The RFC 7517 JWK Set of every key that verifies at ``now`` (current key first)."""
        return {"keys": [key.jwk() for key in self.valid_keys(now)]}

    # changing -----------------------------------------------------------------------------------

    def rotate(self, now: datetime | None = None) -> SigningKey:
        """Make a new current key; the old one verifies until ``now + overlap``. Keys already
        retired at ``now`` are dropped. Saves the ring when it has a path."""
        moment = _moment(now)
        with self._lock:
            new = SigningKey.generate(moment)
            old = self._keys[0]
            retired = SigningKey(old.kid, old.private_key, old.created_at, moment + self.overlap)
            kept = [key for key in self._keys[1:] if key.valid_at(moment)]
            self._keys = (new, retired, *kept)
            if self.path is not None:
                self._write(self.path)
        return new

    def save(self, path: str | os.PathLike[str] | None = None) -> None:
        """Write the ring to ``path`` (default: its own path; the ring then lives there)."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ConfigError(
                "this key ring has no directory",
                field="keyring",
                fix="pass a directory to save() or create the ring with path=",
            )
        with self._lock:
            self.path = target
            self._write(target)

    def refresh(self) -> bool:
        """Reload the ring if its directory changed since it was read or written (another
        process rotated); True when it did. A no-op without a path."""
        if self.path is None:
            return False
        with self._lock:
            if _stamp(self.path) == self._stamp:
                return False
            fresh = self._read(self.path, self.overlap)
            self._keys, self._stamp = fresh._keys, fresh._stamp
        return True

    # files --------------------------------------------------------------------------------------

    def _write(self, target: Path) -> None:
        try:
            target.mkdir(parents=True, exist_ok=True, mode=0o700)
            for key in self._keys:
                pem_path = target / f"{key.kid}.pem"
                if not pem_path.exists():
                    pem = key.private_key.private_bytes(
                        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
                    )
                    _write_private(pem_path, pem)
            manifest = {
                "version": _MANIFEST_VERSION,
                "current": self._keys[0].kid,
                "keys": [
                    {
                        "kid": key.kid,
                        "created_at": key.created_at.isoformat(),
                        "retires_at": key.retires_at.isoformat() if key.retires_at else None,
                    }
                    for key in self._keys
                ],
            }
            tmp = target / f".{_MANIFEST}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                json.dump(manifest, handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target / _MANIFEST)
            kids = {key.kid for key in self._keys}
            for pem_path in target.glob("*.pem"):
                if _KID.fullmatch(pem_path.stem) and pem_path.stem not in kids:
                    pem_path.unlink(missing_ok=True)  # a retired key: nothing verifies with it
        except OSError as exc:
            raise _keyring_error(
                f"cannot write the coordinator key ring: {exc.strerror}",
                target,
                "choose a writable directory outside the database",
            ) from exc
        self._stamp = _stamp(target)

    @classmethod
    def _read(cls, target: Path, overlap: timedelta) -> KeyRing:
        stamp = _stamp(target)
        try:
            manifest = _json_object((target / _MANIFEST).read_bytes())
        except FileNotFoundError:
            raise _keyring_error(
                "no coordinator key ring in this directory",
                target,
                "create one with KeyRing.open(path) (the coordinator does on first start)",
            ) from None
        except (OSError, ValueError) as exc:
            raise _keyring_error(
                f"cannot read the key ring manifest: {exc}",
                target,
                f"restore {_MANIFEST} or create a new ring (tokens it signed stop verifying)",
            ) from exc
        entries = manifest.get("keys")
        if (
            manifest.get("version") != _MANIFEST_VERSION
            or not isinstance(entries, list)
            or not entries
            or not all(isinstance(e, dict) for e in entries)
            or entries[0].get("kid") != manifest.get("current")
        ):
            raise _keyring_error(
                "key ring manifest is not of a supported form",
                target,
                f"restore {_MANIFEST} written by this release",
            )
        keys = [cls._read_key(target, entry) for entry in entries]
        ring = cls(keys, overlap=overlap, path=target)
        ring._stamp = stamp
        return ring

    @staticmethod
    def _read_key(target: Path, entry: Mapping[str, Any]) -> SigningKey:
        kid = entry.get("kid")
        if not isinstance(kid, str) or not _KID.fullmatch(kid):
            raise _keyring_error("key ring manifest names an invalid kid", target, "restore it")
        pem_path = target / f"{kid}.pem"
        try:
            _check_private_mode(pem_path)
            private = load_pem_private_key(pem_path.read_bytes(), password=None)
            created = as_utc(datetime.fromisoformat(entry["created_at"]), name="created_at")
            retires_text = entry.get("retires_at")
            retires = (
                as_utc(datetime.fromisoformat(retires_text), name="retires_at")
                if retires_text is not None
                else None
            )
        except FileNotFoundError:
            raise _keyring_error(
                "a key named in the key ring manifest is missing",
                pem_path,
                "restore the key file, or create a new ring",
            ) from None
        except ConfigError:
            raise
        except (OSError, ValueError, TypeError, KeyError, UnsupportedAlgorithm) as exc:
            raise _keyring_error(
                f"cannot load a coordinator signing key: {type(exc).__name__}",
                pem_path,
                "restore the key file written by the coordinator",
            ) from None
        if not isinstance(private, Ed25519PrivateKey) or kid_of(private.public_key()) != kid:
            raise _keyring_error(
                "a coordinator signing key file does not hold the key its name says",
                pem_path,
                "restore the key file written by the coordinator",
            )
        return SigningKey(kid, private, created, retires)


# --- issuing -------------------------------------------------------------------------------------


def _check_text(name: str, value: Any, *, limit: int = 512) -> None:
    if not isinstance(value, str) or not value or len(value) > limit:
        raise ConfigError(
            f"{name} must be a non-empty string of at most {limit} characters",
            field=name,
            value=value,
            fix=f"pass a valid {name}",
        )


def issue_token(
    keyring: KeyRing,
    *,
    sub: str,
    role: str,
    audience: str,
    issuer: str,
    ttl: timedelta = DEFAULT_TTL,
    now: datetime | None = None,
    one_time: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """A compact JWS signed with the ring's current key.

    Claims ``iss, aud, sub, iat, nbf, exp, jti, role`` (plus ``one_time: true`` for a token the
    verifier accepts once) and ``extra`` (which may not override any of them); header ``alg:
    EdDSA, kid, typ: JWT``. ``ttl`` is at most :data:`MAX_TTL`.
    """
    _check_text("sub", sub, limit=MAX_ID_CHARS)
    _check_text("audience", audience)
    _check_text("issuer", issuer)
    if role not in ROLES:
        raise ConfigError(
            "unknown role", field="role", value=role, fix=f"use one of {sorted(ROLES)}"
        )
    if not timedelta(0) < ttl <= MAX_TTL:
        raise ConfigError(
            "token lifetime must be positive and at most a day",
            field="ttl",
            value=str(ttl),
            fix=f"use a short TTL (default {DEFAULT_TTL})",
        )
    clash = sorted(_REGISTERED.intersection(extra or {}))
    if clash:
        raise ConfigError(
            "extra claims may not override registered ones",
            field="extra",
            value=clash,
            fix="use other claim names",
        )
    moment = _moment(now)
    issued = math.floor(moment.timestamp())
    claims: dict[str, Any] = {
        **(extra or {}),
        "iss": issuer,
        "aud": audience,
        "sub": sub,
        "iat": issued,
        "nbf": issued,
        "exp": issued + math.ceil(ttl.total_seconds()),
        "jti": secrets.token_urlsafe(16),
        "role": role,
    }
    if one_time:
        claims["one_time"] = True
    key = keyring.current
    return jwt.encode(
        claims, key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid, "typ": "JWT"}
    )


# --- verifying -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claims:
    """A verified token's claims. ``extra`` holds the claims beyond the registered ones."""

    sub: str
    role: str
    issuer: str
    audience: str | tuple[str, ...]
    jti: str
    issued_at: datetime
    expires_at: datetime
    not_before: datetime | None = None
    one_time: bool = False
    kid: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)


class ReplayCache(Protocol):
    """Where one-time tokens' ``jti`` are recorded (:class:`.enrolment.StoreReplayCache` keeps
    them in the coordinator's database, shared by all its workers)."""

    def claim(self, jti: str, *, expires_at: datetime, now: datetime) -> bool:
        """Record ``jti`` as used until ``expires_at``, atomically: True on first use, False when
        it is already recorded."""
        ...


class MemoryReplayCache:
    """An in-process replay cache (one worker, tests). Forgets on restart."""

    def __init__(self) -> None:
        self._used: dict[str, datetime] = {}
        self._lock = threading.Lock()

    def claim(self, jti: str, *, expires_at: datetime, now: datetime) -> bool:
        with self._lock:
            for old in [j for j, until in self._used.items() if until <= now]:
                del self._used[old]
            if jti in self._used:
                return False
            self._used[jti] = expires_at
            return True

    def __len__(self) -> int:
        return len(self._used)


_MAX_VERIFIED = 4096  # tokens a verifier remembers (see TokenVerifier.verify)


class _Times(NamedTuple):
    """A verified token's ``exp``, ``iat`` and ``nbf`` (NumericDates as sent)."""

    exp: float
    iat: float
    nbf: float | None


def _times(payload: Mapping[str, Any]) -> _Times:
    nbf = payload.get("nbf")
    return _Times(float(payload["exp"]), float(payload["iat"]), None if nbf is None else float(nbf))


def _reject(message: str, code: str, **kwargs: Any) -> AuthError:
    return AuthError(f"token rejected: {message}", code=code, **kwargs)


def _number(claims: Mapping[str, Any], name: str) -> float:
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _reject(f"{name} is not a NumericDate", "bad_claim", field=name)
    return float(value)


def _datetime(value: float, name: str) -> datetime:
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        raise _reject(f"{name} is out of range", "bad_claim", field=name) from None


class TokenVerifier:
    """Verifies the coordinator's tokens (see the module docstring for every check, in order).

    ``keys`` is the coordinator's :class:`KeyRing` (keys looked up at verification time, so a
    rotation or an overlap's end applies at once; an unknown ``kid`` makes a ring with a path
    :meth:`KeyRing.refresh` once) or a JWKS dict (a remote verifier). ``is_active(sub)`` returning
    False rejects the token (a disabled participant). ``replay_cache`` is needed for one-time
    tokens; without one they are refused.
    """

    def __init__(
        self,
        keys: KeyRing | Mapping[str, Any],
        *,
        issuer: str,
        audience: str,
        replay_cache: ReplayCache | None = None,
        clock: Callable[[], datetime] = utcnow,
        leeway: timedelta = DEFAULT_LEEWAY,
        is_active: Callable[[str], bool] | None = None,
        is_known_active: Callable[[str], bool | None] | None = None,
    ) -> None:
        _check_text("issuer", issuer)
        _check_text("audience", audience)
        if not timedelta(0) <= leeway <= timedelta(minutes=5):
            raise ConfigError(
                "leeway must be between 0 and 5 minutes",
                field="leeway",
                value=str(leeway),
                fix=f"use a small clock-skew allowance (default {DEFAULT_LEEWAY})",
            )
        self._ring = keys if isinstance(keys, KeyRing) else None
        self._static = None if isinstance(keys, KeyRing) else keys_from_jwks(keys)
        self.issuer = issuer
        self.audience = audience
        self.replay_cache = replay_cache
        self.clock = clock
        self.leeway = leeway
        self.is_active = is_active
        self.is_known_active = is_known_active
        self._jws = jwt.PyJWS(algorithms=[ALGORITHM])
        # Tokens that verified, with the key that verified them and their times: a participant
        # sends the same token on every request, and its signature need not be checked again.
        # What can change is checked on every use: the key (rotated away or retired: a miss),
        # the times, the subject's status. One-time tokens are never remembered.
        self._verified: dict[str, tuple[Ed25519PublicKey, Claims, _Times]] = {}

    def _key(self, kid: str, now: datetime) -> Ed25519PublicKey | None:
        if self._ring is None:
            assert self._static is not None
            return self._static.get(kid)
        key = self._ring.public_key(kid, now)
        if key is None and all(k.kid != kid for k in self._ring.keys) and self._ring.refresh():
            key = self._ring.public_key(kid, now)
        return key

    def verify_remembered(self, token: str, *, now: datetime | None = None) -> Claims | None:
        """:meth:`verify` without any I/O, for an event loop: the claims of a token that
        verified before, once its key, times and subject (``is_known_active``: True, False, or
        None when it would have to read) are checked again; None when that is not enough and
        :meth:`verify` must run. Raises the :class:`AuthError` that :meth:`verify` would."""
        remembered = self._verified.get(token) if isinstance(token, str) else None
        if remembered is None or self.is_known_active is None:
            return None
        key, claims, times = remembered
        moment = as_utc(now if now is not None else self.clock())
        # (a ring's refresh reads files: on a miss verify() looks again)
        ring = self._ring
        current = ring.public_key(claims.kid, moment) if ring else self._key(claims.kid, moment)
        if current != key:
            return None
        self._check_times(times, moment)
        active = self.is_known_active(claims.sub)
        if active is None:
            return None
        if not active:
            raise _reject("subject is disabled or not enrolled", "disabled", field="sub")
        return claims

    def verify(self, token: str, *, now: datetime | None = None) -> Claims:
        """The token's claims, or :class:`AuthError` (never containing the token)."""
        moment = as_utc(now if now is not None else self.clock())
        remembered = self._verified.get(token) if isinstance(token, str) else None
        if remembered is not None:
            key, claims, times = remembered
            if self._key(claims.kid, moment) == key:  # still verifies, and is the same key
                self._check_times(times, moment)
                self._check_active(claims)
                return claims
        kid = self._check_header(token)
        key = self._key(kid, moment)
        if key is None:
            raise _reject("unknown signing key", "unknown_kid", field="kid", value=kid[:16])
        try:
            decoded = self._jws.decode_complete(token, key=key, algorithms=[ALGORITHM])
        except jwt.InvalidSignatureError:
            raise _reject("signature does not verify", "bad_signature") from None
        except jwt.InvalidTokenError:
            raise _reject("token is malformed", "malformed") from None
        try:
            payload = _json_object(decoded["payload"])
        except ValueError:
            raise _reject("payload is not a JSON object", "malformed") from None
        claims = self._check_claims(payload, moment, kid)
        self._check_active(claims)
        if claims.one_time:
            if self.replay_cache is None:
                raise _reject("one-time tokens need a replay cache", "no_replay_cache")
            if not self.replay_cache.claim(
                claims.jti, expires_at=claims.expires_at + self.leeway, now=moment
            ):
                raise _reject("one-time token was already used", "replayed", field="jti")
            return claims
        if len(self._verified) >= _MAX_VERIFIED:
            self._verified.clear()  # a participant's token is remembered again on its next use
        self._verified[token] = (key, claims, _times(payload))
        return claims

    def _check_active(self, claims: Claims) -> None:
        if self.is_active is not None and not self.is_active(claims.sub):
            raise _reject("subject is disabled or not enrolled", "disabled", field="sub")

    def _check_times(self, times: _Times, now: datetime) -> None:
        current, leeway = now.timestamp(), self.leeway.total_seconds()
        if current >= times.exp + leeway:
            raise _reject("token has expired", "expired", field="exp")
        if times.nbf is not None and current + leeway < times.nbf:
            raise _reject("token is not valid yet", "not_yet_valid", field="nbf")
        if current + leeway < times.iat:
            raise _reject("token was issued in the future", "not_yet_valid", field="iat")

    @staticmethod
    def _check_header(token: Any) -> str:
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_CHARS:
            raise _reject("not a compact JWT", "malformed")
        segments = token.split(".")
        if len(segments) != 3:
            raise _reject("not a compact JWT", "malformed")
        try:
            for segment in segments[1:]:
                _b64decode(segment)
            header = _json_object(_b64decode(segments[0]))
        except (ValueError, UnicodeDecodeError):
            raise _reject("not a compact JWT", "malformed") from None
        if header.get("alg") != ALGORITHM:  # before any key is touched: none, HS256...
            raise _reject("algorithm not allowed", "bad_algorithm", field="alg")
        if "crit" in header:
            raise _reject("critical header extensions are not supported", "unsupported_crit")
        if not _HEADER_PARAMS.issuperset(header) or header.get("typ", "JWT") != "JWT":
            raise _reject("unexpected header parameter", "bad_header")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise _reject("token names no signing key", "unknown_kid", field="kid")
        return kid

    def _check_claims(self, payload: dict[str, Any], now: datetime, kid: str) -> Claims:
        for name in REQUIRED_CLAIMS:
            if name not in payload:
                raise _reject(f"claim {name} is missing", "missing_claim", field=name)
        exp, iat = _number(payload, "exp"), _number(payload, "iat")
        nbf = _number(payload, "nbf") if "nbf" in payload else None
        sub, jti, role = payload["sub"], payload["jti"], payload["role"]
        for name, value in (("sub", sub), ("jti", jti)):
            if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
                raise _reject(f"claim {name} is not a valid id", "bad_claim", field=name)
        if not isinstance(role, str) or role not in ROLES:
            raise _reject("claim role is not a known role", "bad_claim", field="role")
        one_time = payload.get("one_time", False)
        if not isinstance(one_time, bool):
            raise _reject("claim one_time is not a boolean", "bad_claim", field="one_time")
        iss = payload["iss"]
        if not isinstance(iss, str) or iss != self.issuer:  # exact: no prefix, no substring
            raise _reject("issuer does not match", "wrong_issuer", field="iss")
        aud = payload["aud"]
        if isinstance(aud, str):
            audience: str | tuple[str, ...] = aud
            matches = aud == self.audience
        elif isinstance(aud, list) and aud and all(isinstance(a, str) for a in aud):
            audience = tuple(aud)
            matches = self.audience in audience  # exact element match
        else:
            raise _reject("claim aud is not a string or list of strings", "bad_claim", field="aud")
        if not matches:
            raise _reject("audience does not match", "wrong_audience", field="aud")
        if exp - iat > MAX_TTL.total_seconds():
            raise _reject("token lifetime exceeds the maximum", "bad_claim", field="exp")
        self._check_times(_Times(exp, iat, nbf), now)
        return Claims(
            sub=sub,
            role=role,
            issuer=iss,
            audience=audience,
            jti=jti,
            issued_at=_datetime(iat, "iat"),
            expires_at=_datetime(exp, "exp"),
            not_before=_datetime(nbf, "nbf") if nbf is not None else None,
            one_time=one_time,
            kid=kid,
            extra={k: v for k, v in payload.items() if k not in _REGISTERED},
        )
