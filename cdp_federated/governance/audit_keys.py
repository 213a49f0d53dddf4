"""Ed25519 keys that sign the audit chain's head (see :mod:`cdp_federated.governance.audit`).

The private key lives in a file outside the database (default ``<data_dir>/keys/audit-ed25519.key``,
setting ``audit_key``), PKCS#8 PEM, created with mode 0600 in a 0700 directory; a key file that
group or others may read is refused. Verifying needs only the public key
(``cdp-fl audit export-key`` prints it). ``key_id`` is the first 16 hex characters of the sha256
of the raw 32-byte public key.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from ..errors import AuditKeyError
from ..keyfiles import check_private_mode
from ..settings import data_dir, get_setting

__all__ = [
    "AuditPublicKey",
    "AuditSigner",
    "default_key_path",
    "generate_key",
    "load_signer",
    "load_public_key",
    "key_id_of",
]

_PRIVATE_PEM = b"-----BEGIN PRIVATE KEY-----"


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """First 16 hex characters of sha256(raw public key)."""
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class AuditPublicKey:
    """What a verifier needs: checks checkpoint signatures. ``path`` is the file it came from (its
    directory is where the anchor files are looked for), or None."""

    public_key: Ed25519PublicKey = field(repr=False)
    key_id: str
    path: Path | None = None

    @classmethod
    def from_key(cls, public_key: Ed25519PublicKey, path: Path | None = None) -> AuditPublicKey:
        return cls(public_key, key_id_of(public_key), path)

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            self.public_key.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def public_pem(self) -> str:
        return self.public_key.public_bytes(
            Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
        ).decode()

    @property
    def public(self) -> AuditPublicKey:
        return self


@dataclass(frozen=True)
class AuditSigner(AuditPublicKey):
    """The private key: signs chain heads (and verifies, like :class:`AuditPublicKey`)."""

    private_key: Ed25519PrivateKey | None = field(default=None, repr=False)

    @classmethod
    def from_private(cls, private_key: Ed25519PrivateKey, path: Path | None = None) -> AuditSigner:
        public = private_key.public_key()
        return cls(public, key_id_of(public), path, private_key)

    @classmethod
    def generate(cls) -> AuditSigner:
        """A fresh in-memory key (tests; use :func:`generate_key` to keep one in a file)."""
        return cls.from_private(Ed25519PrivateKey.generate())

    def sign(self, message: bytes) -> bytes:
        if self.private_key is None:
            raise AuditKeyError(
                "this audit key has no private part",
                field="audit_key",
                value=str(self.path) if self.path else self.key_id,
                fix="load the key with load_signer(path)",
            )
        return self.private_key.sign(message)

    @property
    def public(self) -> AuditPublicKey:
        return AuditPublicKey(self.public_key, self.key_id, self.path)


def default_key_path() -> Path:
    """The ``audit_key`` setting, else ``<data_dir>/keys/audit-ed25519.key``."""
    configured = get_setting("audit_key")
    if configured:
        return Path(os.path.expanduser(str(configured)))
    return data_dir() / "keys" / "audit-ed25519.key"


def generate_key(path: str | os.PathLike[str] | None = None) -> AuditSigner:
    """Create a new signing key file (mode 0600, its directory 0700 when created). Refuses to
    overwrite an existing file: the old key is the only one that verifies the old checkpoints."""
    target = Path(path) if path is not None else default_key_path()
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise AuditKeyError(
            "audit key file already exists",
            field="audit_key",
            value=str(target),
            fix="keep it (it verifies the existing checkpoints) or choose another path",
        ) from None
    except OSError as exc:
        raise AuditKeyError(
            f"cannot create audit key file: {exc.strerror}",
            field="audit_key",
            value=str(target),
            fix="choose a writable directory outside the database",
        ) from exc
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    return AuditSigner.from_private(private, target)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise AuditKeyError(
            "audit key file not found",
            field="audit_key",
            value=str(path),
            fix="run `cdp-fl audit init-key` (signing) or pass --public-key PATH (verifying)",
        ) from None
    except OSError as exc:
        raise AuditKeyError(
            f"cannot read audit key file: {exc.strerror}",
            field="audit_key",
            value=str(path),
            fix="check the file's permissions",
        ) from exc


def _check_private_mode(path: Path) -> None:
    check_private_mode(
        path,
        lambda message, value, fix: AuditKeyError(
            f"audit signing key: {message}", field="audit_key", value=value, fix=fix
        ),
    )


def _load_private(path: Path, data: bytes) -> Ed25519PrivateKey:
    _check_private_mode(path)
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise AuditKeyError(
            "audit key file is not an unencrypted PEM private key",
            field="audit_key",
            value=str(path),
            fix="point audit_key at the file `cdp-fl audit init-key` created",
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditKeyError(
            "audit key is not an Ed25519 key",
            field="audit_key",
            value=str(path),
            fix="create one with `cdp-fl audit init-key`",
        )
    return key


def load_signer(path: str | os.PathLike[str] | None = None) -> AuditSigner:
    """The signing key from ``path`` (default :func:`default_key_path`)."""
    target = Path(path) if path is not None else default_key_path()
    return AuditSigner.from_private(_load_private(target, _read(target)), target)


def load_public_key(path: str | os.PathLike[str] | None = None) -> AuditPublicKey:
    """The public key from a public-key PEM, or derived from a private key file."""
    target = Path(path) if path is not None else default_key_path()
    data = _read(target)
    if _PRIVATE_PEM in data:
        return AuditSigner.from_private(_load_private(target, data), target).public
    try:
        key = load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise AuditKeyError(
            "file is not a PEM public key",
            field="public_key",
            value=str(target),
            fix="use the output of `cdp-fl audit export-key`",
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise AuditKeyError(
            "public key is not an Ed25519 key",
            field="public_key",
            value=str(target),
            fix="use the output of `cdp-fl audit export-key`",
        )
    return AuditPublicKey.from_key(key, target)
