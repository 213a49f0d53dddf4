"""The vertical part of a :class:`~cdp_federated.jobs.JobSpec`: who holds the label, who holds
which columns, how rows are aligned and encrypted.

A vertical job is a ``JobSpec`` with ``kind: vertical`` and ``model: secureboost`` or ``logreg``
(``vertical_logreg`` is accepted as an alias), ``features`` listing every party's columns and
``rounds`` counting trees (SecureBoost) or epochs (logistic regression). Everything vertical sits
in ``params``, so the spec's wire form is the one horizontal jobs already use::

    params:
      active: shop                      # the label party (it also holds the HE secret key)
      parties:
        shop:  {features: [age, visits]}
        brand: {features: [affinity], key_format: sha256_hex}
      id_kind: email                    # what each party's connector id_column holds
      align: psi                        # ECDH PSI over the relay (the only method over the service)
      he: paillier                      # or ou (opt-in, see docs/vertical.md)
      key_bits: 2048
      test_fraction: 0.2                # held-out aligned customers, scored cooperatively
      max_depth: 3                      # model parameters (SecureBoostParams / LogRegParams)

Both the coordinator (at submission) and each participant (before reading a row) parse it with
:meth:`VerticalJob.from_spec`, so a bad vertical job is refused before anything runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .jobs import JobSpec

__all__ = [
    "VERTICAL_SERVICE_MODELS",
    "KEY_FORMATS",
    "VerticalParty",
    "VerticalJob",
]

VERTICAL_SERVICE_MODELS = ("secureboost", "logreg")
MODEL_ALIASES = {"vertical_logreg": "logreg"}
# How a party's identifier column is written: raw values (normalised here), or the SHA-256 of
# the normalised value in hex or base64 (a party that only keeps hashed emails).
KEY_FORMATS = ("raw", "sha256_hex", "sha256_b64")
HE_SCHEMES = ("paillier", "ou")
HE_BACKENDS = ("heu", "phe")
_SECUREBOOST_PARAMS = (
    "objective",
    "max_depth",
    "learning_rate",
    "max_bins",
    "reg_lambda",
    "gamma",
    "min_child_weight",
    "first_tree_active_only",
    "chunk_rows",
)
_LOGREG_PARAMS = ("objective", "learning_rate", "l2", "batch_size", "chunk_rows")
_JOB_PARAMS = (
    "active",
    "parties",
    "id_kind",
    "id_scheme",
    "id_region",
    "align",
    "he",
    "he_backend",
    "key_bits",
    "insecure_keys",
    "test_fraction",
    "split_salt",
    "reply_timeout_seconds",
    "lawful_basis",
)


@dataclass(frozen=True)
class VerticalParty:
    """One party: its own feature columns and how its identifier column is written."""

    name: str
    features: tuple[str, ...]
    key_format: str = "raw"


@dataclass(frozen=True)
class VerticalJob:
    """A validated vertical job; ``job`` is the spec it was read from."""

    job: JobSpec
    active: str
    parties: Mapping[str, VerticalParty]
    model_params: Mapping[str, Any]
    id_kind: str = "email"
    id_scheme: str = "uid2"
    id_region: str | None = None
    align: str = "psi"
    he: str = "paillier"
    he_backend: str = "heu"
    key_bits: int = 2048
    insecure_keys: bool = False
    test_fraction: float = 0.2
    split_salt: str = ""
    reply_timeout_seconds: float = 600.0

    @property
    def model(self) -> str:
        return MODEL_ALIASES.get(self.job.model, self.job.model)

    @property
    def passives(self) -> list[str]:
        return sorted(n for n in self.parties if n != self.active)

    @property
    def objective(self) -> str:
        return str(self.model_params.get("objective", "binary"))

    def role(self, name: str) -> str:
        """``"active"`` or ``"passive"``; a :class:`ConfigError` for a party not in the job."""
        if name not in self.parties:
            raise ConfigError(
                f"participant {name!r} is not a party of vertical job {self.job.job_id!r}",
                field="params.parties",
                value=name,
                fix=f"list it under params.parties (parties: {sorted(self.parties)})",
            )
        return "active" if name == self.active else "passive"

    def local_spec(self, name: str) -> JobSpec:
        """The job as party ``name`` evaluates it against its own policy: only its own features
        (a party's policy judges the columns it contributes, not its partners')."""
        party = self.parties[name]
        return dataclasses.replace(self.job, features=party.features)

    def secureboost_params(self) -> Any:
        from .learning.vertical import SecureBoostParams

        return SecureBoostParams(n_trees=self.job.rounds, **self.model_params)

    def logreg_params(self) -> Any:
        from .learning.vertical import LogRegParams

        return LogRegParams(epochs=self.job.rounds, **self.model_params)

    @classmethod
    def from_spec(cls, spec: JobSpec) -> VerticalJob:
        """Check every vertical setting of ``spec``; raises :class:`ConfigError` naming the
        field, the value and the fix."""
        model = MODEL_ALIASES.get(spec.model, spec.model)
        if spec.kind != "vertical" or model not in VERTICAL_SERVICE_MODELS:
            raise ConfigError(
                "a vertical job trains secureboost or logreg",
                field="job.kind",  # as the service names a kind/model mismatch
                value={"kind": spec.kind, "model": spec.model},
                fix="use kind: vertical and model: secureboost or logreg",
            )
        params = dict(spec.params)
        if "parties" not in params:  # most likely a horizontal job marked vertical
            raise ConfigError(
                "a vertical job names its parties and their columns in params.parties (and the "
                "label party in params.active); for a horizontal job use kind: horizontal",
                field="job.kind",
                value=spec.kind,
                fix="use kind: horizontal, or add params.parties: {shop: {features: [age]}, "
                "brand: {features: [affinity]}} and params.active",
            )
        allowed = _JOB_PARAMS + (_SECUREBOOST_PARAMS if model == "secureboost" else _LOGREG_PARAMS)
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ConfigError(
                f"unknown vertical job parameter(s): {', '.join(unknown)}",
                field=f"params.{unknown[0]}",
                value=unknown[0],
                fix=f"use only {', '.join(allowed)}",
            )
        parties = _parties(params.get("parties"), spec)
        active = params.get("active")
        if active not in parties:
            raise ConfigError(
                "params.active must name the label party, one of params.parties",
                field="params.active",
                value=active,
                fix=f"set active to one of {sorted(parties)}",
            )
        if len(parties) < 2:
            raise ConfigError(
                "a vertical job needs the label party and at least one passive party",
                field="params.parties",
                value=sorted(parties),
                fix="list a passive party holding feature columns",
            )
        if not all(parties[n].features for n in parties if n != active):
            raise ConfigError(
                "every passive party must contribute at least one feature column",
                field="params.parties",
                value=[n for n in parties if n != active and not parties[n].features],
                fix="list its columns under params.parties.NAME.features, or leave it out",
            )
        align = params.get("align", "psi")
        if align != "psi":
            raise ConfigError(
                "the coordinator service aligns vertical parties with PSI only",
                field="params.align",
                value=align,
                fix="use align: psi (salted hashing needs a secret shared by every party, which "
                "is only offered in `cdp-fl simulate vertical` inside one organisation)",
            )
        he = _choice(params, "he", "paillier", HE_SCHEMES)
        backend = _choice(params, "he_backend", "heu", HE_BACKENDS)
        if backend == "phe" and he != "paillier":
            raise ConfigError(
                "the phe backend only does Paillier",
                field="params.he_backend",
                value=backend,
                fix="use he_backend: heu for OU",
            )
        key_bits = params.get("key_bits", 2048)
        insecure = params.get("insecure_keys", False)
        if not isinstance(insecure, bool):
            raise ConfigError("insecure_keys must be true or false", field="params.insecure_keys")
        if not isinstance(key_bits, int) or isinstance(key_bits, bool) or key_bits < 512:
            raise ConfigError(
                "key_bits must be an integer", field="params.key_bits", value=key_bits
            )
        if key_bits < 2048 and not insecure:
            raise ConfigError(
                f"{key_bits}-bit HE keys are not secure",
                field="params.key_bits",
                value=key_bits,
                fix="use 2048 bits or more (insecure_keys: true only in tests)",
            )
        fraction = params.get("test_fraction", 0.2)
        if not isinstance(fraction, int | float) or isinstance(fraction, bool):
            fraction = -1
        if not 0 <= fraction < 1:
            raise ConfigError(
                "test_fraction must be a number in [0, 1)",
                field="params.test_fraction",
                value=params.get("test_fraction"),
                fix="hold out for example 0.2 of the aligned customers",
            )
        timeout = params.get("reply_timeout_seconds", 600.0)
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
            raise ConfigError(
                "reply_timeout_seconds must be a positive number",
                field="params.reply_timeout_seconds",
                value=timeout,
            )
        model_keys = _SECUREBOOST_PARAMS if model == "secureboost" else _LOGREG_PARAMS
        job = cls(
            job=spec,
            active=active,
            parties=parties,
            model_params={k: params[k] for k in model_keys if k in params},
            id_kind=str(params.get("id_kind", "email")),
            id_scheme=str(params.get("id_scheme", "uid2")),
            id_region=params.get("id_region"),
            align=align,
            he=he,
            he_backend=backend,
            key_bits=key_bits,
            insecure_keys=insecure,
            test_fraction=float(fraction),
            split_salt=str(params.get("split_salt", "")),
            reply_timeout_seconds=float(timeout),
        )
        job._check_identity()
        # the model's own checks (depth, bins, rates...), with their field names
        try:
            job.secureboost_params() if model == "secureboost" else job.logreg_params()
        except TypeError as exc:
            raise ConfigError(f"invalid model parameters: {exc}", field="params") from None
        except ConfigError as exc:
            raise ConfigError(
                exc.message, field=f"params.{exc.field}", value=exc.value, fix=exc.fix
            ) from None
        return job

    def _check_identity(self) -> None:
        from .identity.normalize import KINDS, SCHEMES

        if self.id_kind not in KINDS or self.id_scheme not in SCHEMES:
            raise ConfigError(
                "unknown identifier kind or normalisation scheme",
                field="params.id_kind",
                value={"id_kind": self.id_kind, "id_scheme": self.id_scheme},
                fix=f"use id_kind one of {KINDS} and id_scheme one of {SCHEMES}",
            )
        hashed = [p.name for p in self.parties.values() if p.key_format != "raw"]
        if hashed and self.id_kind != "email":
            raise ConfigError(
                "hashed identifier columns are supported for emails only",
                field="params.parties",
                value=hashed,
                fix="give raw identifiers, or use id_kind: email",
            )


def _choice(params: Mapping[str, Any], name: str, default: str, options: tuple[str, ...]) -> str:
    value = params.get(name, default)
    if value not in options:
        raise ConfigError(
            f"unknown {name}", field=f"params.{name}", value=value, fix=f"use one of {options}"
        )
    return str(value)


def _parties(raw: Any, spec: JobSpec) -> dict[str, VerticalParty]:
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(
            "params.parties must map each party to its feature columns",
            field="params.parties",
            fix="parties: {shop: {features: [age]}, brand: {features: [affinity]}}",
        )
    out: dict[str, VerticalParty] = {}
    seen: dict[str, str] = {}
    for name, body in raw.items():
        body = body or {}
        if not isinstance(name, str) or not isinstance(body, Mapping):
            raise ConfigError("each party needs a mapping", field="params.parties", value=name)
        extra = sorted(set(body) - {"features", "key_format"})
        if extra:
            raise ConfigError(
                f"unknown party setting {extra[0]!r}",
                field=f"params.parties.{name}",
                value=extra,
                fix="use features and key_format",
            )
        features = body.get("features", [])
        if not isinstance(features, list | tuple) or not all(isinstance(f, str) for f in features):
            raise ConfigError(
                "features must be a list of column names", field=f"params.parties.{name}.features"
            )
        for column in features:
            if column in seen:
                raise ConfigError(
                    f"column {column!r} is listed for two parties",
                    field=f"params.parties.{name}.features",
                    value=[seen[column], name],
                    fix="each column belongs to exactly one party",
                )
            seen[column] = name
        key_format = body.get("key_format", "raw")
        if key_format not in KEY_FORMATS:
            raise ConfigError(
                "unknown key_format",
                field=f"params.parties.{name}.key_format",
                value=key_format,
                fix=f"use one of {KEY_FORMATS}",
            )
        out[name] = VerticalParty(name, tuple(features), key_format)
    if set(seen) != set(spec.features):
        raise ConfigError(
            "job.features must list exactly the parties' feature columns",
            field="job.features",
            value=sorted(set(seen) ^ set(spec.features)),
            fix="list every party's columns in features, and no other",
        )
    if spec.label in seen:
        raise ConfigError(
            "the label cannot be a party's feature",
            field="job.label",
            value=spec.label,
            fix="remove the label from params.parties.*.features",
        )
    return out
