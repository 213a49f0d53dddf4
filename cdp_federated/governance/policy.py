"""Declarative governance policies: load a YAML file, validate it, and expose a frozen model.

Validation happens once, at the boundary, in three passes, and every error carries the line of the
YAML it is about:

1. YAML syntax (PyYAML's marks give line and column), plus duplicate keys, which PyYAML would
   otherwise resolve silently by keeping the last one;
2. the published JSON Schema (``policy_schema.json``, Draft 2020-12, every object closed with
   ``additionalProperties: false`` so a misspelt key is an error);
3. semantic checks the schema cannot express (contradictions between sections).

All errors of a file are reported together in one :class:`PolicySchemaError`, as
``(line, "dotted.path", message)`` triples.

A policy's identity is :attr:`Policy.content_hash`: the SHA-256 of the canonical JSON of the
validated, normalised document (defaults filled in, lists that are sets sorted, keys sorted), so
comments, whitespace, key order, list order and number spelling (``8`` vs ``8.0``) do not change it,
while any change of value does.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from ..errors import PolicySchemaError, PolicyViolation

__all__ = [
    "BUILTIN_PII",
    "ConsentPurpose",
    "ConsentRule",
    "ConsentSettings",
    "DPBudget",
    "DPSettings",
    "FeatureSettings",
    "IdentitySettings",
    "Minimums",
    "OutputSettings",
    "Partner",
    "Policy",
    "PrivacySettings",
    "PurposeSettings",
    "Residency",
    "TCFRequirement",
    "load_policy",
    "matches_pattern",
    "normalise_column_name",
    "pii_term",
    "policy_schema",
    "region_matches",
]

PathPart = str | int
JsonPath = tuple[PathPart, ...]

# --- Built-in PII ----------------------------------------------------------------------------------
#
# Column names that can never be features or labels, whatever a policy's ``allowed`` says. Names are
# compared after normalise_column_name (camelCase split, lower-cased, accents and punctuation
# folded into "_"), token by token:
#
# * a STRONG term matches wherever its words appear in the name: ``Email_Address``, ``customerEmail``,
#   ``e-mail``, ``billing_zip_code``, ``ip_country`` and ``phone_model`` are all PII;
# * a WHOLE term matches only the whole name once decorations are stripped (prefixes such as
#   ``customer_``, ``billing_``, ``hashed_``; suffixes such as ``_hash``, ``_raw`` or a trailing
#   number): ``name``, ``customer_name`` and ``address1`` are PII, while ``product_name``,
#   ``is_mobile`` and ``mobile_sessions_30d`` are not.
#
# Hashing does not make an identifier anonymous (a hashed email is still personal data), which is
# why ``hashed_`` and ``_sha256`` are decorations rather than escapes.

_STRONG_PII: tuple[str, ...] = (
    "email", "e_mail", "emailaddress", "phone", "phonenumber", "telephone", "msisdn",
    "ssn", "social_security", "national_id", "national_insurance", "nino", "passport", "tax_id",
    "ip", "ip_address", "ipaddress", "ipv4", "ipv6",
    "date_of_birth", "dob", "birth_date", "birthdate", "birthday",
    "postcode", "post_code", "postal_code", "zip", "zipcode", "zip_code",
    "first_name", "firstname", "last_name", "lastname", "full_name", "fullname", "given_name",
    "family_name", "surname", "maiden_name", "username",
    "street", "street_address", "latitude", "longitude", "geolocation",
    "iban", "credit_card", "card_number", "device_id", "idfa", "gaid", "advertising_id",
)  # fmt: skip
_WHOLE_PII: tuple[str, ...] = ("name", "address", "mobile", "lat", "lng", "lon", "long")
_PII_PREFIXES = frozenset(
    "customer cust user contact billing shipping delivery home work primary secondary personal "
    "mailing raw hashed hash sha256 sha1 md5 normalized normalised clean person profile account "
    "owner recipient buyer sender".split()
)
_PII_SUFFIXES = frozenset(
    "hash hashed sha256 sha1 md5 raw normalized normalised clean e164 lower".split()
)
BUILTIN_PII: tuple[str, ...] = tuple(sorted(_STRONG_PII + _WHOLE_PII))
"""Every built-in PII term (see :func:`pii_term` for how column names are matched)."""

_STRONG_TOKENS = tuple((term, tuple(term.split("_"))) for term in _STRONG_PII)


def normalise_column_name(name: str) -> str:
    """``Email_Address``, ``emailAddress`` and ``e-mail address`` -> ``email_address``/``e_mail_address``:
    accents dropped, camelCase split, lower case, every run of other characters one ``_``."""
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    text = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", text)
    text = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", text)
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _contains(tokens: Sequence[str], words: Sequence[str]) -> bool:
    n = len(words)
    return any(tuple(tokens[i : i + n]) == tuple(words) for i in range(len(tokens) - n + 1))


def pii_term(column: str) -> str | None:
    """The built-in PII term ``column`` matches, or None (see the comment above BUILTIN_PII)."""
    norm = normalise_column_name(column)
    if not norm:
        return None
    tokens = norm.split("_")
    undigited = [re.sub(r"\d+$", "", t) or t for t in tokens]  # email2 -> email
    for term, words in _STRONG_TOKENS:
        if _contains(tokens, words) or _contains(undigited, words):
            return term
    core = list(undigited)
    while len(core) > 1 and core[0] in _PII_PREFIXES:
        core.pop(0)
    while len(core) > 1 and (core[-1] in _PII_SUFFIXES or core[-1].isdigit()):
        core.pop()
    joined = "_".join(core)
    return joined if joined in _WHOLE_PII else None


_GLOB = re.compile(r"[*?\[]")


def matches_pattern(column: str, pattern: str) -> bool:
    """Case-insensitive glob match of a column against a policy pattern; a pattern without glob
    characters also matches the column's normalised name (``Email_Address`` ~ ``email-address``)."""
    lowered = pattern.lower()
    if fnmatch.fnmatchcase(column.lower(), lowered):
        return True
    norm = normalise_column_name(column)
    if _GLOB.search(pattern):
        return fnmatch.fnmatchcase(norm, lowered)
    return norm == normalise_column_name(pattern)


def region_matches(value: str, prefixes: Sequence[str]) -> str | None:
    """The first prefix ``value`` falls under, case-insensitively: ``EU`` covers ``EU`` and
    ``eu-west`` (never ``EUX``). None when none does."""
    upper = value.upper()
    for prefix in prefixes:
        p = prefix.upper()
        if upper == p or upper.startswith(p + "-"):
            return prefix
    return None


# --- The model -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TCFRequirement:
    """IAB TCF v2.2: the TC string must grant every purpose in ``purposes`` (and, with
    ``vendor_id``, the vendor) on ``basis`` (``consent`` or ``legitimate_interest``)."""

    purposes: tuple[int, ...]
    vendor_id: int | None
    basis: str


@dataclass(frozen=True)
class ConsentRule:
    """What the consent ledger needs to decide a job purpose (see ``consent/purposes.py``)."""

    purpose: str
    signals: tuple[str, ...]
    opt_out_signals: tuple[str, ...]
    tcf: TCFRequirement | None
    opt_in_prefixes: tuple[str, ...]
    opt_out_prefixes: tuple[str, ...]
    unknown_default: bool


@dataclass(frozen=True)
class PurposeSettings:
    allowed: tuple[str, ...]
    lawful_basis: str


@dataclass(frozen=True)
class ConsentPurpose:
    purpose: str
    signals: tuple[str, ...]
    opt_out_signals: tuple[str, ...]
    tcf: TCFRequirement | None


@dataclass(frozen=True)
class ConsentSettings:
    unknown_jurisdiction: str  # "deny" | "allow"
    opt_in: tuple[str, ...]
    opt_out: tuple[str, ...]
    purposes: tuple[ConsentPurpose, ...]  # sorted by purpose

    def get(self, purpose: str) -> ConsentPurpose | None:
        return next((p for p in self.purposes if p.purpose == purpose), None)


@dataclass(frozen=True)
class Partner:
    name: str
    organisation: str
    region: str
    roles: tuple[str, ...]


@dataclass(frozen=True)
class FeatureSettings:
    allowed: tuple[str, ...]
    forbidden: tuple[str, ...]


@dataclass(frozen=True)
class Residency:
    data_regions: tuple[str, ...]
    coordinator_regions: tuple[str, ...]


@dataclass(frozen=True)
class Minimums:
    rows_per_party: int
    cohort_size: int


@dataclass(frozen=True)
class IdentitySettings:
    methods: tuple[str, ...]


@dataclass(frozen=True)
class DPBudget:
    epsilon: float
    window_days: int


@dataclass(frozen=True)
class DPSettings:
    epsilon_per_run: float
    delta: float
    budget: DPBudget | None


@dataclass(frozen=True)
class PrivacySettings:
    secure_aggregation: str  # "required" | "optional"
    dp: DPSettings | None


@dataclass(frozen=True)
class OutputSettings:
    uses: tuple[str, ...]
    retention_days: int


@dataclass(frozen=True)
class Policy:
    """A validated policy. Build it with :func:`load_policy`; ``content_hash`` is its identity."""

    name: str
    version: int
    description: str
    purposes: PurposeSettings
    consent: ConsentSettings
    partners: tuple[Partner, ...]  # sorted by name
    features: FeatureSettings
    residency: Residency
    minimums: Minimums
    identity: IdentitySettings
    privacy: PrivacySettings
    outputs: OutputSettings
    content_hash: str
    canonical_json: str = field(repr=False, compare=False, default="")
    source: str = field(compare=False, default="")  # where it was loaded from (not hashed)

    @property
    def short_hash(self) -> str:
        return self.content_hash[:12]

    @property
    def organisations(self) -> tuple[str, ...]:
        return tuple(sorted({p.organisation for p in self.partners}))

    def partner(self, name: str) -> Partner | None:
        return next((p for p in self.partners if p.name == name), None)

    def purpose_rule(self, job_purpose: str) -> ConsentRule:
        """The consent ledger's rule for ``job_purpose``; PolicyViolation when the policy does
        not allow that purpose."""
        entry = self.consent.get(job_purpose)
        if job_purpose not in self.purposes.allowed or entry is None:
            raise PolicyViolation(
                f"policy {self.name!r} does not allow purpose {job_purpose!r}",
                reasons=(
                    f"purposes.allowed: {job_purpose!r} is not in {list(self.purposes.allowed)}",
                ),
                field="purpose",
                value=job_purpose,
                fix=f"use one of {', '.join(self.purposes.allowed)}, or change the policy",
            )
        return ConsentRule(
            purpose=job_purpose,
            signals=entry.signals,
            opt_out_signals=entry.opt_out_signals,
            tcf=entry.tcf,
            opt_in_prefixes=self.consent.opt_in,
            opt_out_prefixes=self.consent.opt_out,
            unknown_default=self.consent.unknown_jurisdiction == "allow",
        )

    def to_dict(self) -> dict[str, Any]:
        """The normalised document: :attr:`content_hash` is the SHA-256 of its canonical JSON
        (:attr:`canonical_json`: keys sorted, no spaces, UTF-8)."""
        return json.loads(self.canonical_json)


# --- Loading ---------------------------------------------------------------------------------------


@cache
def _schema_text() -> str:
    return resources.files(__package__).joinpath("policy_schema.json").read_text(encoding="utf-8")


def policy_schema() -> dict[str, Any]:
    """The published JSON Schema (a fresh copy; ``policies/policy.schema.json`` is the same file)."""
    return json.loads(_schema_text())


@cache
def _validator() -> Draft202012Validator:
    schema = policy_schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def load_policy(path_or_text: str | Path) -> Policy:
    """Load and validate a policy from a file path or from YAML text.

    A :class:`~pathlib.Path`, or a one-line string naming an existing file or ending in
    ``.yaml``/``.yml``/``.json``, is read as a file; any other string is YAML text. Raises
    :class:`PolicySchemaError` listing every error with its line.
    """
    text, source = _read(path_or_text)
    root = _compose(text, source)
    data = _construct(text, source)
    errors: list[tuple[JsonPath, str]] = []
    if root is not None:
        errors.extend(_duplicate_keys(root))
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}, not a mapping"
        if isinstance(data, str) and source == "<text>" and "\n" not in text.strip():
            kind += " (read as YAML text: no such file)"
        _raise(source, [(None, "", f"the policy document is {kind}")])
    schema_errors = list(_schema_errors(data))
    errors.extend(schema_errors)
    errors.extend(_semantic_errors(data, strict=not schema_errors))
    if errors:
        _raise(source, [(_line_of(root, path), _dotted(path), msg) for path, msg in errors])
    return _build(data, source)


def _read(path_or_text: str | Path) -> tuple[str, str]:
    if isinstance(path_or_text, Path):
        return _read_file(path_or_text), str(path_or_text)
    if "\n" not in path_or_text and (
        path_or_text.endswith((".yaml", ".yml", ".json")) or Path(path_or_text).is_file()
    ):
        return _read_file(Path(path_or_text)), path_or_text
    return path_or_text, "<text>"


def _read_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicySchemaError(
            f"cannot read policy file: {exc}",
            errors=((None, "", str(exc)),),
            field="policy",
            value=str(path),
            fix="pass the path of a UTF-8 YAML policy file",
        ) from exc


def _yaml_error(exc: yaml.YAMLError, source: str) -> PolicySchemaError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    text = f"YAML syntax error: {problem}" + (f" ({context})" if context else "")
    if mark is not None:
        text += f" at column {mark.column + 1}"
    line = mark.line + 1 if mark is not None else None
    return PolicySchemaError(
        f"{source}: {'line ' + str(line) + ': ' if line else ''}{text}",
        errors=((line, "", text),),
        field="policy",
        value=source,
        fix="fix the YAML syntax at the line shown (indentation, quotes, colons)",
    )


def _compose(text: str, source: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from None


def _construct(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from None


def _raise(source: str, errors: list[tuple[int | None, str, str]]) -> NoReturn:
    errors.sort(key=lambda e: (e[0] if e[0] is not None else 0, e[1]))
    line, path, msg = errors[0]
    where = f"line {line}: " if line else ""
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    raise PolicySchemaError(
        f"{source}: {len(errors)} policy error{'s' if len(errors) > 1 else ''}: "
        f"{where}{path + ': ' if path else ''}{msg}{more}",
        errors=tuple(errors),
        field=path or "policy",
        value=source,
        fix="correct each listed line (see policies/README.md for every field)",
    )


# --- Line numbers ----------------------------------------------------------------------------------


def _dotted(path: JsonPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line_of(root: yaml.Node | None, path: JsonPath) -> int | None:
    """The 1-based line of ``path`` in the composed YAML: a mapping entry's key line, a sequence
    item's own line; the deepest existing ancestor when the path does not exist (a missing key)."""
    if root is None:
        return None
    node: yaml.Node = root
    line = root.start_mark.line + 1
    for part in path:
        if isinstance(node, yaml.MappingNode):
            found = None
            for key, value in node.value:  # the last duplicate wins, as when constructing
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    found = (key, value)
            if found is None:
                return line
            line, node = found[0].start_mark.line + 1, found[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return line
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _duplicate_keys(node: yaml.Node, path: JsonPath = ()) -> Iterator[tuple[JsonPath, str]]:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else str(key)
            if name in seen:
                yield (
                    (*path, name),
                    f"duplicate key {name!r} (first at line {seen[name]}); YAML would silently "
                    "keep only the last one",
                )
            else:
                seen[name] = key.start_mark.line + 1
            yield from _duplicate_keys(value, (*path, name))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _duplicate_keys(item, (*path, i))


# --- Schema errors ---------------------------------------------------------------------------------

_YAML_BOOLEANS = "yes, no, on, off, y, n, true and false"


def _schema_errors(data: Any) -> Iterator[tuple[JsonPath, str]]:
    for error in sorted(_validator().iter_errors(data), key=lambda e: list(map(str, e.path))):
        yield from _explain(error)


def _explain(error: ValidationError) -> Iterator[tuple[JsonPath, str]]:
    path: JsonPath = tuple(error.absolute_path)
    kind, instance, schema = error.validator, error.instance, error.schema
    if "propertyNames" in error.relative_schema_path:  # the error is about a key, not its value
        path = (*path, str(instance))
    if kind == "additionalProperties" and isinstance(instance, dict):
        known = list(schema.get("properties", {}))
        for key in instance:
            if key in known:
                continue
            hint = difflib.get_close_matches(str(key), known, n=1)
            suffix = f"; did you mean {hint[0]!r}?" if hint else f"; known keys: {', '.join(known)}"
            yield (*path, key), f"unknown key {key!r}{suffix}"
        return
    if kind == "required":
        missing = re.match(r"'(.+)' is a required property", error.message)
        name = missing.group(1) if missing else str(error.validator_value)
        yield (*path, name), f"missing required key {name!r}"
        return
    if kind == "enum":
        allowed = ", ".join(str(v) for v in error.validator_value)
        yield path, f"{instance!r} is not one of: {allowed}{_scalar_hint(instance)}"
        return
    if kind == "pattern":
        what = schema.get("description") or f"a value matching {error.validator_value}"
        yield path, f"{instance!r} is not {what}"
        return
    if kind == "type":
        yield path, f"{instance!r} is not of type {error.validator_value}{_scalar_hint(instance)}"
        return
    if kind == "uniqueItems" and isinstance(instance, list):
        dups = sorted({repr(v) for v in instance if instance.count(v) > 1})
        yield path, f"duplicate items: {', '.join(dups)}"
        return
    yield path, error.message


def _scalar_hint(value: Any) -> str:
    if isinstance(value, bool):
        return f" (YAML 1.1 reads unquoted {_YAML_BOOLEANS} as booleans: quote the value)"
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
        return " (YAML 1.1 reads this as text: write the number with a dot and a signed exponent, e.g. 1.0e-6)"
    return ""


# --- Semantic checks -------------------------------------------------------------------------------

_GUARDED = (TypeError, KeyError, AttributeError, ValueError, IndexError)


def _semantic_errors(data: dict[str, Any], *, strict: bool) -> list[tuple[JsonPath, str]]:
    """Contradictions the schema cannot express. Each check runs on its own; on a document that
    failed the schema a check that trips over a malformed section is skipped (that section's
    schema error is already reported); on a schema-valid one every check must run."""
    out: list[tuple[JsonPath, str]] = []
    for check in _CHECKS:
        try:
            out.extend(check(data))
        except _GUARDED:
            if strict:
                raise
    return out


def _g(data: Any, *keys: str, default: Any = None) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return default
        data = data[key]
    return data


def _check_jurisdictions(data: dict[str, Any]) -> Iterator[tuple[JsonPath, str]]:
    opt_in = _g(data, "consent", "jurisdictions", "opt_in", default=[]) or []
    opt_out = _g(data, "consent", "jurisdictions", "opt_out", default=[]) or []
    for i, code in enumerate(opt_out):
        shadow = region_matches(code, opt_in)
        if shadow is None:
            continue
        if shadow == code:
            msg = f"{code!r} is listed both as opt_in and as opt_out"
        else:
            msg = (
                f"{code!r} can never apply: opt_in {shadow!r} covers it and opt-in prefixes are "
                "matched first"
            )
        yield ("consent", "jurisdictions", "opt_out", i), msg


def _check_consent_purposes(data: dict[str, Any]) -> Iterator[tuple[JsonPath, str]]:
    allowed = list(_g(data, "purposes", "allowed", default=[]) or [])
    mapped = _g(data, "consent", "purposes", default={}) or {}
    opt_in = _g(data, "consent", "jurisdictions", "opt_in", default=[]) or []
    for purpose, entry in mapped.items():
        path: JsonPath = ("consent", "purposes", purpose)
        if purpose not in allowed:
            yield path, f"consent purpose {purpose!r} is not in purposes.allowed {allowed}"
        signals = entry.get("signals") or []
        for i, signal in enumerate(signals):
            if signal.startswith("gpc:"):
                yield (
                    (*path, "signals", i),
                    f"{signal!r} can only deny (Global Privacy Control is an opt-out): list it "
                    "under opt_out_signals",
                )
        if opt_in and not signals and not entry.get("tcf"):
            yield (
                path,
                f"no granting signal and no tcf requirement: profiles in the opt-in jurisdictions "
                f"{', '.join(opt_in)} could never be used for {purpose!r}",
            )
        tcf = entry.get("tcf")
        if tcf and tcf.get("basis") == "legitimate_interest":
            barred = sorted(set(tcf.get("purposes", [])) & {1, 3, 4, 5, 6})
            if barred:
                yield (
                    (*path, "tcf", "purposes"),
                    f"TCF v2.2 allows only consent, not legitimate interest, for purposes "
                    f"{barred}: use basis: consent",
                )
    for i, purpose in enumerate(allowed):
        if purpose not in mapped:
            yield (
                ("purposes", "allowed", i),
                f"purpose {purpose!r} has no consent.purposes entry saying which signals decide it",
            )


def _check_partners(data: dict[str, Any]) -> Iterator[tuple[JsonPath, str]]:
    partners = _g(data, "partners", default=[]) or []
    seen: dict[str, int] = {}
    for i, partner in enumerate(partners):
        name = partner["name"]
        if name in seen:
            yield (
                ("partners", i, "name"),
                f"partner {name!r} is listed twice (also item {seen[name]})",
            )
        seen.setdefault(name, i)
    coordinator_regions = _g(data, "residency", "coordinator_regions", default=[]) or []
    data_regions = _g(data, "residency", "data_regions", default=[]) or []
    for i, partner in enumerate(partners):
        roles, region = partner["roles"], partner["region"]
        if "coordinator" in roles and not region_matches(region, coordinator_regions):
            yield (
                ("partners", i, "region"),
                f"coordinator {partner['name']!r} is in {region!r}, which is not in "
                f"residency.coordinator_regions {coordinator_regions}",
            )
        data_roles = {"participant", "label_holder"} & set(roles)
        if data_roles and not region_matches(region, data_regions):
            yield (
                ("partners", i, "region"),
                f"participant {partner['name']!r} keeps its data in {region!r}, which is not in "
                f"residency.data_regions {data_regions}",
            )
    methods = _g(data, "identity", "methods", default=[]) or []
    organisations = sorted({p["organisation"] for p in partners})
    if "salted_hash" in methods and len(organisations) > 1:
        yield (
            ("identity", "methods", methods.index("salted_hash")),
            f"salted_hash is only allowed when every partner belongs to one organisation "
            f"(partners span {', '.join(organisations)}): a partner holding the salt can hash a "
            "dictionary of likely emails and phones and learn who the others' customers are; use psi",
        )


def _check_features(data: dict[str, Any]) -> Iterator[tuple[JsonPath, str]]:
    allowed = _g(data, "features", "allowed", default=[]) or []
    for i, pattern in enumerate(allowed):
        if _GLOB.search(pattern):
            continue
        term = pii_term(pattern)
        if term is not None:
            yield (
                ("features", "allowed", i),
                f"{pattern!r} is built-in PII ({term}) and can never be a feature; remove it",
            )


def _check_privacy(data: dict[str, Any]) -> Iterator[tuple[JsonPath, str]]:
    dp = _g(data, "privacy", "dp")
    if not isinstance(dp, dict):
        return
    per_run, delta = dp.get("epsilon_per_run"), dp.get("delta")
    budget = _g(dp, "budget", "epsilon")
    if isinstance(per_run, int | float) and isinstance(budget, int | float) and per_run > budget:
        yield (
            ("privacy", "dp", "epsilon_per_run"),
            f"epsilon_per_run {per_run} exceeds the whole budget epsilon {budget}: no job could run",
        )
    rows = _g(data, "minimums", "rows_per_party")
    if isinstance(delta, int | float) and isinstance(rows, int) and rows > 0 and delta >= 1 / rows:
        yield (
            ("privacy", "dp", "delta"),
            f"delta {delta} is not below 1/rows_per_party ({1 / rows:.3g}): such a delta permits "
            "releasing a whole row; use e.g. 1.0e-6",
        )


_CHECKS: tuple[Callable[[dict[str, Any]], Iterator[tuple[JsonPath, str]]], ...] = (
    _check_jurisdictions,
    _check_consent_purposes,
    _check_partners,
    _check_features,
    _check_privacy,
)


# --- Normalisation, hash and model -----------------------------------------------------------------


def _sorted(values: Any) -> list[Any]:
    return sorted(values or [])


def _normalise(data: Mapping[str, Any]) -> dict[str, Any]:
    """The canonical document: every optional field present, set-like lists sorted, floats as
    floats. Its canonical JSON is what :attr:`Policy.content_hash` hashes."""
    consent = data["consent"]
    jurisdictions = consent.get("jurisdictions") or {}
    dp = data["privacy"].get("dp")
    return {
        "policy": data["policy"],
        "version": int(data["version"]),
        "description": (data.get("description") or "").strip(),
        "purposes": {
            "allowed": _sorted(data["purposes"]["allowed"]),
            "lawful_basis": data["purposes"]["lawful_basis"],
        },
        "consent": {
            "unknown_jurisdiction": consent["unknown_jurisdiction"],
            "jurisdictions": {
                "opt_in": _sorted(jurisdictions.get("opt_in")),
                "opt_out": _sorted(jurisdictions.get("opt_out")),
            },
            "purposes": {
                name: {
                    "signals": _sorted(entry.get("signals")),
                    "opt_out_signals": _sorted(entry.get("opt_out_signals")),
                    "tcf": None
                    if not entry.get("tcf")
                    else {
                        "purposes": sorted(int(n) for n in entry["tcf"]["purposes"]),
                        "vendor_id": _int_or_none(entry["tcf"].get("vendor_id")),
                        "basis": entry["tcf"]["basis"],
                    },
                }
                for name, entry in (consent.get("purposes") or {}).items()
            },
        },
        "partners": sorted(
            (
                {
                    "name": p["name"],
                    "organisation": p["organisation"],
                    "region": p["region"],
                    "roles": _sorted(p["roles"]),
                }
                for p in data["partners"]
            ),
            key=lambda p: p["name"],
        ),
        "features": {
            "allowed": _sorted(data["features"]["allowed"]),
            "forbidden": _sorted(data["features"].get("forbidden")),
        },
        "residency": {
            "data_regions": _sorted(data["residency"]["data_regions"]),
            "coordinator_regions": _sorted(data["residency"]["coordinator_regions"]),
        },
        "minimums": {
            "rows_per_party": int(data["minimums"]["rows_per_party"]),
            "cohort_size": int(data["minimums"]["cohort_size"]),
        },
        "identity": {"methods": _sorted(data["identity"]["methods"])},
        "privacy": {
            "secure_aggregation": data["privacy"]["secure_aggregation"],
            "dp": None
            if not dp
            else {
                "epsilon_per_run": float(dp["epsilon_per_run"]),
                "delta": float(dp["delta"]),
                "budget": None
                if not dp.get("budget")
                else {
                    "epsilon": float(dp["budget"]["epsilon"]),
                    "window_days": int(dp["budget"]["window_days"]),
                },
            },
        },
        "outputs": {
            "uses": _sorted(data["outputs"]["uses"]),
            "retention_days": int(data["outputs"]["retention_days"]),
        },
    }


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _canonical_json(document: Mapping[str, Any]) -> bytes:
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _tcf(entry: Mapping[str, Any] | None) -> TCFRequirement | None:
    if not entry:
        return None
    return TCFRequirement(tuple(entry["purposes"]), entry.get("vendor_id"), entry["basis"])


def _build(data: Mapping[str, Any], source: str) -> Policy:
    doc = _normalise(data)
    canonical = _canonical_json(doc)
    consent, privacy, dp = doc["consent"], doc["privacy"], doc["privacy"]["dp"]
    return Policy(
        name=doc["policy"],
        version=doc["version"],
        description=doc["description"],
        purposes=PurposeSettings(
            tuple(doc["purposes"]["allowed"]), doc["purposes"]["lawful_basis"]
        ),
        consent=ConsentSettings(
            unknown_jurisdiction=consent["unknown_jurisdiction"],
            opt_in=tuple(consent["jurisdictions"]["opt_in"]),
            opt_out=tuple(consent["jurisdictions"]["opt_out"]),
            purposes=tuple(
                ConsentPurpose(
                    name,
                    tuple(entry["signals"]),
                    tuple(entry["opt_out_signals"]),
                    _tcf(entry["tcf"]),
                )
                for name, entry in sorted(consent["purposes"].items())
            ),
        ),
        partners=tuple(
            Partner(p["name"], p["organisation"], p["region"], tuple(p["roles"]))
            for p in doc["partners"]
        ),
        features=FeatureSettings(
            tuple(doc["features"]["allowed"]), tuple(doc["features"]["forbidden"])
        ),
        residency=Residency(
            tuple(doc["residency"]["data_regions"]), tuple(doc["residency"]["coordinator_regions"])
        ),
        minimums=Minimums(doc["minimums"]["rows_per_party"], doc["minimums"]["cohort_size"]),
        identity=IdentitySettings(tuple(doc["identity"]["methods"])),
        privacy=PrivacySettings(
            privacy["secure_aggregation"],
            None
            if dp is None
            else DPSettings(
                dp["epsilon_per_run"],
                dp["delta"],
                None
                if dp["budget"] is None
                else DPBudget(dp["budget"]["epsilon"], dp["budget"]["window_days"]),
            ),
        ),
        outputs=OutputSettings(tuple(doc["outputs"]["uses"]), doc["outputs"]["retention_days"]),
        content_hash=hashlib.sha256(canonical).hexdigest(),
        canonical_json=canonical.decode("utf-8"),
        source=source,
    )
