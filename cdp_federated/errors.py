"""One exception hierarchy for cdp-federated.

Every error names what was wrong (``field``), the offending ``value`` and how to fix it (``fix``),
so a user reading a log line or a CLI message knows what to do next. Subclasses mix in the built-in
exception that callers would naturally catch (``ValueError``, ``PermissionError``...).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "NotFoundError",
    "ConflictError",
    "PayloadTooLargeError",
    "UnsupportedMediaTypeError",
    "CDPFederatedError",
    "ConfigError",
    "EventValidationError",
    "ConnectorError",
    "UnknownConnectorError",
    "MissingColumnError",
    "ColumnTypeError",
    "SourceUnavailableError",
    "StoreError",
    "SchemaVersionError",
    "CodecError",
    "TransportError",
    "TrainingError",
    "SchemaMismatchError",
    "NoTrainingDataError",
    "SetupRequiredError",
    "ModelFormatError",
    "PluginError",
    "PolicyViolation",
    "TCFError",
    "PolicySchemaError",
    "AuditIntegrityError",
    "AuditKeyError",
    "AuditPayloadError",
    "BudgetExceededError",
    "IdentifierError",
    "ProtocolError",
    "AuthError",
    "ForbiddenError",
]

_MAX_VALUE_CHARS = 120


def _short(value: Any) -> str:
    text = repr(value)
    if len(text) > _MAX_VALUE_CHARS:
        text = text[: _MAX_VALUE_CHARS - 3] + "..."
    return text


class CDPFederatedError(Exception):
    """Base class. ``str(err)`` is a one-line, user-readable message."""

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        value: Any = None,
        fix: str | None = None,
        **context: Any,
    ) -> None:
        self.message = message
        self.field = field
        self.value = value
        self.fix = fix
        self.context = context
        super().__init__(self._render())

    def _render(self) -> str:
        parts = [self.message]
        if self.field is not None:
            parts.append(f"field={self.field}")
        if self.value is not None:
            parts.append(f"value={_short(self.value)}")
        text = "; ".join(parts)
        if self.fix:
            text += f". Fix: {self.fix}"
        return text

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (used by ``--json`` outputs and dead-letter reasons)."""
        out: dict[str, Any] = {"error": type(self).__name__, "message": self.message}
        if self.field is not None:
            out["field"] = self.field
        if self.value is not None:
            out["value"] = _short(self.value)
        if self.fix:
            out["fix"] = self.fix
        return out


class ConfigError(CDPFederatedError, ValueError):
    """A configuration file, setting or CLI option is invalid."""


class EventValidationError(CDPFederatedError, ValueError):
    """A Segment-spec event is invalid; the host dead-letters it with this reason."""

    def __init__(self, message: str, *, code: str, **kwargs: Any) -> None:
        self.code = code
        super().__init__(message, **kwargs)


class ConnectorError(CDPFederatedError):
    """A data source could not be read as declared."""


class UnknownConnectorError(ConnectorError, LookupError):
    """No registered connector handles the requested ``type``."""


class MissingColumnError(ConnectorError, KeyError):
    """A declared column is absent from the source."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self._render()


class ColumnTypeError(ConnectorError, TypeError):
    """A column cannot be converted to the type the schema contract requires."""


class SourceUnavailableError(ConnectorError, OSError):
    """The file, stream or database behind a connector cannot be reached."""


class StoreError(CDPFederatedError, RuntimeError):
    """The local store (SQLite/PostgreSQL) failed or is unreachable."""


class SchemaVersionError(StoreError):
    """The database schema version is not the one this release expects."""


class CodecError(CDPFederatedError, ValueError):
    """A federation message could not be encoded or decoded."""


class TransportError(CDPFederatedError, ConnectionError):
    """A message could not be delivered to or from a participant."""


class TrainingError(CDPFederatedError, RuntimeError):
    """A training job could not proceed."""


class SchemaMismatchError(TrainingError, ValueError):
    """Participants disagree on features or label."""


class NoTrainingDataError(TrainingError):
    """A participant has no rows left to train on."""


class SetupRequiredError(TrainingError, LookupError):
    """A participant was asked to train under a job setup it does not hold (it restarted, or
    never received it); the coordinator answers by sending the full setup again."""


class ModelFormatError(CDPFederatedError, ValueError):
    """A saved model file is malformed or of an unsupported version."""


class PluginError(CDPFederatedError, RuntimeError):
    """A plugin is malformed (unknown hook, bad return value)."""


class PolicyViolation(CDPFederatedError, PermissionError):
    """A participant's local governance refused the job; ``reasons`` lists every rule that fired."""

    def __init__(self, message: str, *, reasons: tuple[str, ...] = (), **kwargs: Any) -> None:
        self.reasons = reasons
        super().__init__(message, **kwargs)


class TCFError(CDPFederatedError, ValueError):
    """An IAB TCF TC string is malformed, truncated, of an unsupported version or violates policy."""


class PolicySchemaError(ConfigError):
    """A policy file does not match the published schema; ``errors`` lists ``(line, path, message)``."""

    def __init__(
        self, message: str, *, errors: tuple[tuple[int | None, str, str], ...] = (), **kwargs: Any
    ) -> None:
        self.errors = errors
        super().__init__(message, **kwargs)


class AuditIntegrityError(CDPFederatedError, RuntimeError):
    """The audit chain does not verify (edited, deleted, reordered or truncated entries)."""


class AuditPayloadError(CDPFederatedError, ValueError):
    """An audit entry's kind or payload is invalid (not JSON-safe, NaN, too large, missing fields)."""


class AuditKeyError(ConfigError):
    """The audit signing key is missing, unreadable or does not match the signed heads."""


class BudgetExceededError(PolicyViolation):
    """A job would spend more privacy budget (epsilon) than the policy's window allows."""


class IdentifierError(CDPFederatedError, ValueError):
    """An identifier (email, phone, id) cannot be normalised under the requested scheme."""


class ProtocolError(CDPFederatedError, ValueError):
    """A protocol message is out of order, tampered with, or inconsistent with the stage."""


class AuthError(CDPFederatedError, PermissionError):
    """Authentication failed (HTTP 401): a token or an enrolment secret was refused.

    ``code`` names the check that failed (``expired``, ``bad_signature``, ``unknown_kid``,
    ``replayed``, ``wrong_audience``...) for logs and tests; a service answers every code with
    the same bare 401 so a caller learns nothing about which check failed. The message never
    contains the token or secret.
    """

    http_status = 401

    def __init__(self, message: str, *, code: str, **kwargs: Any) -> None:
        self.code = code
        super().__init__(message, **kwargs)


class ForbiddenError(CDPFederatedError, PermissionError):
    """An authenticated caller may not do this (HTTP 403): its role, participant id, job or round
    does not allow the action. ``code`` names the rule (``role``, ``other_participant``,
    ``not_in_job``, ``not_in_round``, ``missing_scope``)."""

    http_status = 403

    def __init__(self, message: str, *, code: str, **kwargs: Any) -> None:
        self.code = code
        super().__init__(message, **kwargs)


class NotFoundError(CDPFederatedError, LookupError):
    """The job (or other resource) does not exist (HTTP 404)."""

    http_status = 404


class ConflictError(CDPFederatedError):
    """The request conflicts with the stored state (HTTP 409): a job id already taken, another
    result for an answered task, a result after the task's deadline."""

    http_status = 409


class PayloadTooLargeError(CDPFederatedError, ValueError):
    """A request body exceeds the service's limit (HTTP 413)."""

    http_status = 413


class UnsupportedMediaTypeError(CDPFederatedError, ValueError):
    """A request body has the wrong content type (HTTP 415)."""

    http_status = 415
