"""Normalise identifiers the way the ad-tech industry does, so hashes match across parties.

Three schemes, each following its vendor's published rules (sources and worked examples in
``docs/identity.md``; the tests replay the published examples):

============  =====================================================  ==================  ==========
scheme        email                                                  phone               SHA-256 as
============  =====================================================  ==================  ==========
``uid2``      trim, lowercase; ``gmail.com`` only: drop dots and the  E.164 with ``+``    base64 of
              ``+suffix`` of the local part                                              raw digest
``google``    trim, lowercase; ``gmail.com`` and ``googlemail.com``:  E.164 with ``+``    hex
              drop dots and the ``+suffix`` of the local part
``meta``      trim, lowercase (no provider rules)                    E.164 digits, no    hex
                                                                     ``+``
============  =====================================================  ==================  ==========

Device ids (IDFA, GAID, ...) are trimmed and lowercased (they are hex UUIDs, whose case carries no
meaning, and Apple writes IDFAs in upper case while Google writes GAIDs in lower case); the all-zero
id that iOS and Android return when the user limits ad tracking is invalid. Customer ids are
trimmed opaque strings (case is kept: ``AB12`` and ``ab12`` may be different customers).

Emails are normalised with polars string expressions, never a Python call per row. The validity
check is deliberately simple and documented: after trimming, exactly one ``@``, a non-empty local
part, a domain of at least two non-empty dot-separated labels, and no whitespace or control
characters anywhere. Phones go through ``phonenumbers`` (parsed with ``default_region`` and kept
only if ``is_valid_number``), once per distinct value. Invalid identifiers become nulls that
never match, and are counted; a few examples are kept for debug output only.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
import re
from typing import Literal, get_args

import phonenumbers
import polars as pl

from ..errors import ConfigError, IdentifierError

__all__ = [
    "Kind",
    "Scheme",
    "KINDS",
    "SCHEMES",
    "NormalizedIds",
    "normalize_ids",
    "normalize_one",
    "hash_normalized",
    "email_expr",
]

logger = logging.getLogger(__name__)

Kind = Literal["email", "phone", "device_id", "customer_id"]
Scheme = Literal["uid2", "google", "meta"]
KINDS: tuple[str, ...] = get_args(Kind)
SCHEMES: tuple[str, ...] = get_args(Scheme)

MAX_INVALID_EXAMPLES = 5

# Trimmed from both ends: ASCII whitespace plus the invisible characters that copy-pasted CRM
# exports carry (no-break space, zero-width space, byte-order mark).
TRIM_CHARS = " \t\n\r\x0b\x0c\u00a0\u200b\ufeff"
# Never allowed inside an identifier: ASCII control characters and space, DEL, and the Unicode
# spaces. Written as a regex class that Python's ``re`` and polars' Rust regex read identically.
_SPACE_CLASS = r"\x00-\x20\x7f\u00a0\u1680\u2000-\u200b\u2028\u2029\u202f\u205f\u3000\ufeff"
_EMAIL_PATTERN = rf"^[^@{_SPACE_CLASS}]+@[^@.{_SPACE_CLASS}]+(?:\.[^@.{_SPACE_CLASS}]+)+$"
_DEVICE_PATTERN = rf"^[^{_SPACE_CLASS}]+$"
_EMAIL_RE = re.compile(_EMAIL_PATTERN)
_DEVICE_RE = re.compile(_DEVICE_PATTERN)
ZERO_DEVICE_ID = "00000000-0000-0000-0000-000000000000"

# Mailbox providers whose local part ignores dots and "+tags", per scheme.
_DOT_PLUS_DOMAINS: dict[str, tuple[str, ...]] = {
    "uid2": ("gmail.com",),
    "google": ("gmail.com", "googlemail.com"),
    "meta": (),
}


@dataclasses.dataclass(frozen=True, eq=False)
class NormalizedIds:
    """The result of :func:`normalize_ids`.

    ``values`` has the input's length and order, String dtype, null where the input was missing
    or invalid. ``invalid`` counts invalid (non-null) inputs and ``missing`` null inputs;
    ``duplicates`` counts valid rows whose normalised value already appeared in an earlier row.
    ``invalid_examples`` holds up to five distinct invalid raw inputs: personal data, for debug
    output only (it and ``values`` are left out of ``repr`` so a logged result leaks nothing).
    """

    values: pl.Series = dataclasses.field(repr=False)
    invalid: int
    invalid_examples: tuple[str, ...] = dataclasses.field(repr=False)
    duplicates: int
    missing: int = 0
    kind: str = "email"
    scheme: str = "uid2"

    @property
    def valid(self) -> int:
        """Rows that normalised to a value."""
        return len(self.values) - self.invalid - self.missing


def _check_kind_scheme(kind: str, scheme: str) -> None:
    if kind not in KINDS:
        raise ConfigError(
            "unknown identifier kind",
            field="kind",
            value=kind,
            fix=f"use one of {', '.join(KINDS)}",
        )
    if scheme not in SCHEMES:
        raise ConfigError(
            "unknown normalisation scheme",
            field="scheme",
            value=scheme,
            fix=f"use one of {', '.join(SCHEMES)}",
        )


def _check_region(default_region: str | None) -> str | None:
    if default_region is None:
        return None
    region = default_region.strip().upper()
    if region not in phonenumbers.SUPPORTED_REGIONS:
        raise ConfigError(
            "unknown phone region",
            field="default_region",
            value=default_region,
            fix="use an ISO 3166-1 alpha-2 code such as US, GB, DE",
        )
    return region


# --- emails ----------------------------------------------------------------------------------


def email_expr(expr: pl.Expr, scheme: Scheme) -> pl.Expr:
    """A polars expression normalising the emails in ``expr`` under ``scheme`` (null if invalid).

    Usable inside any (lazy) query, so a connector can normalise without materialising rows.
    """
    _check_kind_scheme("email", scheme)
    trimmed = expr.str.strip_chars(TRIM_CHARS).str.to_lowercase()
    valid = trimmed.str.contains(_EMAIL_PATTERN)
    chain = pl.when(~valid).then(pl.lit(None, dtype=pl.String))
    for domain in _DOT_PLUS_DOMAINS[scheme]:
        suffix = "@" + domain
        local = (
            trimmed.str.strip_suffix(suffix)
            .str.replace(r"\+.*$", "")
            .str.replace_all(".", "", literal=True)
        )
        # The local part can be left empty ("+tag@gmail.com", ".@gmail.com"): invalid.
        rewritten = pl.when(local.str.len_bytes() > 0).then(pl.concat_str([local, pl.lit(suffix)]))
        chain = chain.when(trimmed.str.ends_with(suffix)).then(rewritten)
    return chain.otherwise(trimmed)


def _email_reason(value: str, scheme: str) -> tuple[str | None, str]:
    """The scalar twin of :func:`email_expr`: (normalised or None, reason when invalid)."""
    trimmed = value.strip(TRIM_CHARS).lower()
    if not _EMAIL_RE.fullmatch(trimmed):
        if trimmed.count("@") != 1:
            return None, "an email needs exactly one @"
        local, domain = trimmed.split("@")
        if not local:
            return None, "the part before @ is empty"
        if re.search(f"[{_SPACE_CLASS}]", trimmed):
            return None, "an email cannot contain spaces or control characters"
        return None, "the domain needs at least one dot between non-empty labels"
    local, domain = trimmed.split("@")
    if domain in _DOT_PLUS_DOMAINS[scheme]:
        local = local.partition("+")[0].replace(".", "")
        if not local:
            return None, f"nothing is left of the part before @{domain} once dots and +tag go"
    return f"{local}@{domain}", ""


# --- phones ----------------------------------------------------------------------------------


def _phone_reason(value: str, scheme: str, region: str | None) -> tuple[str | None, str]:
    raw = value.strip(TRIM_CHARS)
    if not raw:
        return None, "the phone number is empty"
    try:
        number = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException as exc:
        if exc.error_type == phonenumbers.NumberParseException.INVALID_COUNTRY_CODE:
            return None, "no country code (start with +) and no default region"
        return None, f"not a phone number ({exc._msg})"
    if not phonenumbers.is_valid_number(number):
        return None, "not a valid number for its country (libphonenumber)"
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return (e164[1:] if scheme == "meta" else e164), ""


def _normalize_phones(trimmed: pl.Series, scheme: str, region: str | None) -> pl.Series:
    """``phonenumbers`` once per distinct value, then mapped back onto every row."""
    uniques = trimmed.drop_nulls().unique()
    mapped = [_phone_reason(v, scheme, region)[0] for v in uniques]
    return trimmed.replace_strict(uniques, mapped, default=None, return_dtype=pl.String)


# --- opaque ids ------------------------------------------------------------------------------


def _device_reason(value: str) -> tuple[str | None, str]:
    trimmed = value.strip(TRIM_CHARS).lower()
    if not _DEVICE_RE.fullmatch(trimmed):
        return None, "a device id must be non-empty with no spaces or control characters"
    if trimmed == ZERO_DEVICE_ID:
        return None, "the all-zero device id means the user limited ad tracking"
    return trimmed, ""


def _customer_reason(value: str) -> tuple[str | None, str]:
    trimmed = value.strip(TRIM_CHARS)
    if not trimmed:
        return None, "the customer id is empty"
    return trimmed, ""


def _as_strings(values: pl.Series) -> pl.Series:
    dtype = values.dtype
    if dtype == pl.String:
        return values
    if dtype == pl.Null or dtype == pl.Categorical or isinstance(dtype, pl.Enum):
        return values.cast(pl.String)
    if dtype.is_integer():
        return values.cast(pl.String)
    raise IdentifierError(
        f"identifiers must be strings (or integers), not {dtype}",
        field="values",
        value=str(dtype),
        fix="cast the column to String first; phones stored as floats have lost digits",
    )


def _count_duplicates(present: pl.Series) -> int:
    """Rows repeating an earlier row's value. Distinct 64-bit hashes prove "no duplicates"
    cheaply; otherwise count exactly on the strings."""
    if present.hash().n_unique() == len(present):
        return 0
    return len(present) - present.cast(pl.Binary).n_unique()


# --- public API ------------------------------------------------------------------------------


def normalize_ids(
    values: pl.Series,
    *,
    kind: Kind,
    scheme: Scheme,
    default_region: str | None = None,
) -> NormalizedIds:
    """Normalise a column of identifiers under ``scheme``; see the module docstring for rules.

    ``default_region`` (ISO 3166-1 alpha-2) is used for phones written without a ``+country``
    prefix; without it such numbers are invalid. Counts are logged at INFO, examples of invalid
    inputs only at DEBUG.
    """
    _check_kind_scheme(kind, scheme)
    region = _check_region(default_region)
    raw = _as_strings(values).rename(values.name or kind)
    if kind == "email":
        # Lazy, so the trimmed-and-lowercased column is computed once for all its uses.
        frame = raw.to_frame("v").lazy().select(email_expr(pl.col("v"), scheme))
        out = frame.collect().to_series()
    elif kind == "phone":
        out = _normalize_phones(raw.str.strip_chars(TRIM_CHARS), scheme, region)
    elif kind == "device_id":
        trimmed = raw.str.strip_chars(TRIM_CHARS).str.to_lowercase()
        ok = trimmed.str.contains(_DEVICE_PATTERN) & (trimmed != ZERO_DEVICE_ID)
        out = pl.select(pl.when(ok).then(trimmed)).to_series()
    else:
        trimmed = raw.str.strip_chars(TRIM_CHARS)
        out = pl.select(pl.when(trimmed.str.len_bytes() > 0).then(trimmed)).to_series()
    out = out.rename(raw.name)

    missing = raw.null_count()
    bad = out.is_null() & raw.is_not_null()
    invalid = int(bad.sum())
    examples: tuple[str, ...] = ()
    if invalid:
        examples = tuple(raw.filter(bad).unique(maintain_order=True).head(MAX_INVALID_EXAMPLES))
    duplicates = _count_duplicates(out.drop_nulls())
    result = NormalizedIds(
        values=out,
        invalid=invalid,
        invalid_examples=examples,
        duplicates=duplicates,
        missing=missing,
        kind=kind,
        scheme=scheme,
    )
    logger.info(
        "normalised %d %s ids (%s): %d invalid, %d missing, %d duplicates",
        len(out),
        kind,
        scheme,
        invalid,
        missing,
        duplicates,
    )
    if examples:
        logger.debug("invalid %s examples: %r", kind, examples)
    return result


def normalize_one(
    value: str,
    *,
    kind: Kind,
    scheme: Scheme,
    default_region: str | None = None,
) -> str:
    """Normalise one identifier (same rules as :func:`normalize_ids`, computed without polars).

    Raises :class:`~cdp_federated.errors.IdentifierError` naming the kind, the input and the
    reason when the value is invalid.
    """
    _check_kind_scheme(kind, scheme)
    region = _check_region(default_region)
    if not isinstance(value, str):
        raise IdentifierError(
            f"a {kind} must be a string", field=kind, value=value, fix="pass the value as text"
        )
    if kind == "email":
        normalized, reason = _email_reason(value, scheme)
        fix = "give an address like name@example.com"
    elif kind == "phone":
        normalized, reason = _phone_reason(value, scheme, region)
        fix = "write the number with its country code (+1 650 555 1212) or give a default region"
    elif kind == "device_id":
        normalized, reason = _device_reason(value)
        fix = "give the raw IDFA/GAID, e.g. 6d92078a-8246-4ba4-ae5b-76104861e7dc"
    else:
        normalized, reason = _customer_reason(value)
        fix = "give a non-empty customer id"
    if normalized is None:
        raise IdentifierError(f"invalid {kind}: {reason}", field=kind, value=value, fix=fix)
    return normalized


def hash_normalized(value: str, scheme: Scheme) -> dict[str, str]:
    """SHA-256 of an already normalised value, in both encodings the schemes use.

    ``uid2`` expects ``sha256_b64`` (standard base64 of the 32 raw digest bytes, with padding);
    ``google`` and ``meta`` expect ``sha256_hex`` (lowercase hex).
    """
    _check_kind_scheme("email", scheme)
    digest = hashlib.sha256(value.encode("utf-8")).digest()
    return {
        "normalized": value,
        "sha256_hex": digest.hex(),
        "sha256_b64": base64.b64encode(digest).decode("ascii"),
    }
