"""Relay envelopes: party-to-party messages that the coordinator carries but cannot read.

Vertical protocols and secure aggregation need participants to talk to each other; they have no
direct connection, so the coordinator relays opaque :class:`RelayEnvelope` frames. An envelope is
end-to-end encrypted *and* sender-authenticated:

* every participant holds a long-term X25519 :class:`RelayKeyPair` (mode-0600 file); the
  coordinator publishes the participants' public keys;
* :func:`seal` encodes the inner message with the codec, draws a fresh ephemeral X25519 key and a
  fresh random 12-byte nonce, and encrypts with ChaCha20-Poly1305 under::

      key = HKDF-SHA256(ikm  = X25519(sender static, recipient static)
                             || X25519(ephemeral, recipient static),
                        salt = "cdp-federated/relay/v1",
                        info = version, sender, recipient, session, and the sender's,
                               recipient's and ephemeral public keys)

  with the canonical header (version, sender, recipient, session, seq, ephemeral public key) as
  associated data;
* :func:`open_envelope` checks the header against what the recipient expects (its own name, the
  session, the sender, the next sequence number), then decrypts; any cryptographic failure is a
  single :class:`~cdp_federated.errors.ProtocolError` (``field="envelope"``) that does not say
  which check failed.

The static-static secret authenticates the sender (only the holder of the sender's private key or
the recipient's can compute it); the ephemeral-static secret makes every envelope's key fresh, so
a compromised *sender* key does not expose the sender's past envelopes. Limits, by construction:
a compromised *recipient* key exposes every envelope sent to it and lets its holder forge
envelopes to that recipient; authentication is not non-repudiation (the recipient could have
made the envelope itself); and the coordinator sees who talks to whom, when, and how much
(the ciphertext is 16 bytes longer than the encoded inner message).
"""

from __future__ import annotations

import dataclasses
import os
import stat
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import CodecError, ConfigError, ProtocolError
from .codec import DEFAULT_CODEC, DEFAULT_MAX_BYTES, Codec
from .messages import Message, register

__all__ = [
    "RELAY_PROTOCOL_VERSION",
    "PUBLIC_KEY_BYTES",
    "NONCE_BYTES",
    "TAG_BYTES",
    "RelayKeyPair",
    "RelayEnvelope",
    "RELAY_CODEC",
    "seal",
    "open_envelope",
]

RELAY_PROTOCOL_VERSION = 1
PUBLIC_KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_NAME_BYTES = 256
_MAX_SEQ = 2**64 - 1
_SALT = b"cdp-federated/relay/v1"
_KEY_LABEL = b"cdp-federated/relay/key"
_HEADER_LABEL = b"cdp-federated/relay/header"
_U8 = np.dtype("uint8")


# --- keys ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RelayKeyPair:
    """A participant's long-term X25519 key pair for relay envelopes.

    Publish :meth:`public_bytes` (the coordinator hands it to the other participants); keep the
    private half in a file only its owner can read (:meth:`save` / :meth:`load`).
    """

    private_key: X25519PrivateKey = dataclasses.field(repr=False)

    @classmethod
    def generate(cls) -> RelayKeyPair:
        """A new key pair from the operating system's randomness."""
        return cls(X25519PrivateKey.generate())

    def public_bytes(self) -> bytes:
        """The 32-byte raw X25519 public key."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the private key as unencrypted PKCS#8 PEM to a new file of mode 0600 (its
        directory 0700 when created). Refuses to overwrite an existing file: a replaced key
        must be re-published before anyone can seal to it."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise _key_error(
                "relay key file already exists",
                target,
                "keep it (its public key is published) or choose another path",
            ) from None
        except OSError as exc:
            raise _key_error(
                f"cannot create relay key file: {exc.strerror}", target, "choose a writable path"
            ) from exc
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RelayKeyPair:
        """Read a key file written by :meth:`save`; refuses files that group or others can read
        or write, symlinks, and anything that is not an X25519 private key."""
        target = Path(path)
        try:
            fd = os.open(target, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise _key_error(
                "relay key file not found", target, "create one with RelayKeyPair.generate().save"
            ) from None
        except OSError as exc:
            raise _key_error(
                f"cannot open relay key file: {exc.strerror}",
                target,
                "point at a regular file, not a symlink, that you can read",
            ) from exc
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise _key_error("relay key path is not a regular file", target, "use a file")
            if os.name == "posix" and info.st_mode & 0o077:
                raise ConfigError(
                    "relay private key is readable or writable by group or others",
                    field="relay_key",
                    value=f"{target} (mode {info.st_mode & 0o777:o})",
                    fix=f"chmod 600 {target}",
                )
            data = handle.read()
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise _key_error(
                "relay key file is not an unencrypted PEM private key",
                target,
                "point at the file RelayKeyPair.save wrote",
            ) from exc
        if not isinstance(key, X25519PrivateKey):
            raise _key_error(
                "relay key file does not hold an X25519 key",
                target,
                "point at the file RelayKeyPair.save wrote",
            )
        return cls(key)


def _key_error(message: str, path: Path, fix: str) -> ConfigError:
    return ConfigError(message, field="relay_key", value=str(path), fix=fix)


# --- the wire message ----------------------------------------------------------------------------


@register(
    "relay_envelope",
    version=1,
    arrays={"ephemeral": "u", "nonce": "u", "ciphertext": "u"},
)
@dataclasses.dataclass(frozen=True, eq=False)
class RelayEnvelope(Message):
    """An end-to-end encrypted message from ``sender`` to ``recipient`` within ``session``.

    The coordinator reads only the routing header (``sender``, ``recipient``, ``session``,
    ``seq``); ``ephemeral`` (32 bytes), ``nonce`` (12) and ``ciphertext`` (encoded inner message
    plus a 16-byte tag) are uint8 arrays it relays untouched.
    """

    sender: str
    recipient: str
    session: str
    seq: int
    ephemeral: np.ndarray
    nonce: np.ndarray
    ciphertext: np.ndarray


# The codec for the relay itself: envelopes only, sized so that any inner message the default codec
# accepts still fits once sealed (the ciphertext travels as one uint8 element per byte). The
# default codec snapshots the registry when it is imported, before this module registers
# ``relay_envelope``, so ``federation.encode`` refuses envelopes: frame them with this codec.
RELAY_CODEC = Codec(
    max_bytes=DEFAULT_MAX_BYTES + 64 * 1024,
    max_elements=DEFAULT_MAX_BYTES + TAG_BYTES + NONCE_BYTES + PUBLIC_KEY_BYTES,
    types={"relay_envelope": RelayEnvelope},
)


# --- seal / open ---------------------------------------------------------------------------------


def seal(
    message: Message,
    *,
    sender: str,
    recipient: str,
    recipient_public: bytes,
    sender_keys: RelayKeyPair,
    session: str,
    seq: int,
    codec: Codec | None = None,
) -> RelayEnvelope:
    """Encrypt ``message`` for ``recipient`` (whose published key is ``recipient_public``).

    ``seq`` numbers this sender's envelopes to this recipient within ``session`` (0, 1, 2...);
    the recipient accepts them only in that order. ``codec`` (default: every registered type,
    default limits) encodes the inner message.
    """
    if isinstance(message, RelayEnvelope):
        raise ProtocolError(
            "an envelope cannot carry another envelope", field="message", fix="seal the message"
        )
    _name(sender, "sender")
    _name(recipient, "recipient")
    _name(session, "session")
    _seq(seq)
    their_static = _public_key(recipient_public, "recipient_public")
    plaintext = (codec or DEFAULT_CODEC).encode(message)
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = _raw(ephemeral.public_key())
    static_secret = _exchange(sender_keys.private_key, their_static, "recipient_public")
    ephemeral_secret = _exchange(ephemeral, their_static, "recipient_public")
    key = _derive_key(
        static_secret + ephemeral_secret,
        sender=sender,
        recipient=recipient,
        session=session,
        sender_public=sender_keys.public_bytes(),
        recipient_public=bytes(recipient_public),
        ephemeral_public=ephemeral_public,
    )
    nonce = os.urandom(NONCE_BYTES)
    header = _header(sender, recipient, session, seq, ephemeral_public)
    ciphertext = ChaCha20Poly1305(key).encrypt(nonce, plaintext, header)
    return RelayEnvelope(
        sender=sender,
        recipient=recipient,
        session=session,
        seq=seq,
        ephemeral=_array(ephemeral_public),
        nonce=_array(nonce),
        ciphertext=_array(ciphertext),
    )


def open_envelope(
    envelope: RelayEnvelope,
    *,
    recipient_keys: RelayKeyPair,
    sender_public: bytes | Mapping[str, bytes],
    expected_sender: str,
    expected_recipient: str,
    session: str,
    expect_seq: int,
    codec: Codec | None = None,
) -> Message:
    """Check ``envelope`` against what the recipient expects, decrypt it and decode the inner
    message. Raises :class:`~cdp_federated.errors.ProtocolError` naming the field on any defect.

    ``sender_public`` is the sender's published key, or the published directory
    (participant -> key) in which the envelope's sender is looked up. The caller tracks
    ``expect_seq`` per (session, sender) and advances it only after this returns.
    """
    if not isinstance(envelope, RelayEnvelope):
        raise ProtocolError("not a relay envelope", field="envelope", value=type(envelope).__name__)
    ephemeral_public = _bytes_field(envelope.ephemeral, "ephemeral", exact=PUBLIC_KEY_BYTES)
    nonce = _bytes_field(envelope.nonce, "nonce", exact=NONCE_BYTES)
    ciphertext = _bytes_field(envelope.ciphertext, "ciphertext", minimum=TAG_BYTES)
    for field, got, want in (
        ("recipient", envelope.recipient, expected_recipient),
        ("session", envelope.session, session),
        ("sender", envelope.sender, expected_sender),
    ):
        _name(got, field)
        if got != want:
            raise ProtocolError(
                f"envelope {field} is not the expected one",
                field=field,
                value=got,
                fix=f"expected {want!r}",
            )
    _seq(envelope.seq)
    if envelope.seq != expect_seq:
        raise ProtocolError(
            "envelope is replayed" if envelope.seq < expect_seq else "envelope is out of order",
            field="seq",
            value=envelope.seq,
            fix=f"expected sequence number {expect_seq}",
        )
    if isinstance(sender_public, Mapping):
        if envelope.sender not in sender_public:
            raise ProtocolError(
                "no published relay key for the sender",
                field="sender_public",
                value=envelope.sender,
                fix="fetch the coordinator's current participant keys",
            )
        sender_public = sender_public[envelope.sender]
    their_static = _public_key(sender_public, "sender_public")
    their_ephemeral = _public_key(ephemeral_public, "ephemeral")
    static_secret = _exchange(recipient_keys.private_key, their_static, "sender_public")
    ephemeral_secret = _exchange(recipient_keys.private_key, their_ephemeral, "ephemeral")
    key = _derive_key(
        static_secret + ephemeral_secret,
        sender=envelope.sender,
        recipient=envelope.recipient,
        session=envelope.session,
        sender_public=bytes(sender_public),
        recipient_public=recipient_keys.public_bytes(),
        ephemeral_public=ephemeral_public,
    )
    header = _header(
        envelope.sender, envelope.recipient, envelope.session, envelope.seq, ephemeral_public
    )
    try:
        plaintext = ChaCha20Poly1305(key).decrypt(nonce, ciphertext, header)
    except InvalidTag:
        raise ProtocolError(
            "relay envelope failed authentication",
            field="envelope",
            fix="it was tampered with, forged, or sealed for other keys; drop it",
        ) from None
    try:
        message = (codec or DEFAULT_CODEC).decode(plaintext)
    except CodecError as exc:
        raise ProtocolError(
            f"envelope holds a malformed message: {exc.message}",
            field="message",
            value=exc.field,
            fix="the sender must seal messages this release can decode",
        ) from exc
    if isinstance(message, RelayEnvelope):
        raise ProtocolError("an envelope cannot carry another envelope", field="message")
    return message


# --- helpers -------------------------------------------------------------------------------------


def _name(value: object, field: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{field} must be a non-empty string", field=field, value=value)
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError(f"{field} is not valid UTF-8 text", field=field, value=value) from None
    if len(raw) > MAX_NAME_BYTES:
        raise ProtocolError(
            f"{field} is longer than {MAX_NAME_BYTES} bytes", field=field, value=len(raw)
        )
    return raw


def _seq(value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_SEQ:
        raise ProtocolError(
            "seq must be an integer in [0, 2**64)", field="seq", value=value, fix="count from 0"
        )


def _bytes_field(value: object, field: str, *, exact: int | None = None, minimum: int = 0) -> bytes:
    array = np.asarray(value)
    if array.dtype != _U8 or array.ndim != 1:
        raise ProtocolError(
            f"{field} must be a one-dimensional uint8 array",
            field=field,
            value=f"{array.dtype.name}{list(array.shape)}",
        )
    size = array.size
    if (exact is not None and size != exact) or size < minimum:
        want = f"{exact} bytes" if exact is not None else f"at least {minimum} bytes"
        raise ProtocolError(f"{field} must be {want}", field=field, value=size)
    return array.tobytes()


def _public_key(raw: object, field: str) -> X25519PublicKey:
    if not isinstance(raw, bytes | bytearray) or len(raw) != PUBLIC_KEY_BYTES:
        raise ProtocolError(
            f"{field} must be a {PUBLIC_KEY_BYTES}-byte X25519 public key",
            field=field,
            value=len(raw) if isinstance(raw, bytes | bytearray) else type(raw).__name__,
        )
    if not any(raw):
        raise ProtocolError(f"{field} is the all-zero point", field=field)
    return X25519PublicKey.from_public_bytes(bytes(raw))


def _exchange(private: X25519PrivateKey, public: X25519PublicKey, field: str) -> bytes:
    try:
        return private.exchange(public)
    except ValueError:  # the shared secret is all zero: a small-order point
        raise ProtocolError(
            f"{field} is a small-order point", field=field, fix="publish a real X25519 key"
        ) from None


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _array(data: bytes) -> np.ndarray:
    array = np.frombuffer(data, dtype=_U8).copy()
    array.setflags(write=False)
    return array


def _field(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def _header(sender: str, recipient: str, session: str, seq: int, ephemeral: bytes) -> bytes:
    """The canonical header: every field length-prefixed, so no two headers encode alike."""
    return b"".join(
        [
            _field(_HEADER_LABEL),
            struct.pack("<H", RELAY_PROTOCOL_VERSION),
            _field(sender.encode()),
            _field(recipient.encode()),
            _field(session.encode()),
            struct.pack("<Q", seq),
            _field(ephemeral),
        ]
    )


def _derive_key(
    secret: bytes,
    *,
    sender: str,
    recipient: str,
    session: str,
    sender_public: bytes,
    recipient_public: bytes,
    ephemeral_public: bytes,
) -> bytes:
    info = b"".join(
        [
            _field(_KEY_LABEL),
            struct.pack("<H", RELAY_PROTOCOL_VERSION),
            _field(sender.encode()),
            _field(recipient.encode()),
            _field(session.encode()),
            _field(sender_public),
            _field(recipient_public),
            _field(ephemeral_public),
        ]
    )
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=info).derive(secret)
