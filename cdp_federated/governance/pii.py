"""Built-in PII: column names that can never be features or labels, whatever a policy's
``allowed`` says.

Names are compared after :func:`normalise_column_name` (camelCase split, lower-cased, accents and
punctuation folded into "_"), token by token:

* a STRONG term matches wherever its words appear in the name: ``Email_Address``, ``customerEmail``,
  ``e-mail``, ``billing_zip_code``, ``ip_country`` and ``phone_model`` are all PII;
* a WHOLE term matches only the whole name once decorations are stripped (prefixes such as
  ``customer_``, ``billing_``, ``hashed_``; suffixes such as ``_hash``, ``_raw`` or a trailing
  number): ``name``, ``customer_name`` and ``address1`` are PII, while ``product_name``,
  ``is_mobile`` and ``mobile_sessions_30d`` are not.

Hashing does not make an identifier anonymous (a hashed email is still personal data), which is
why ``hashed_`` and ``_sha256`` are decorations rather than escapes.
"""

from __future__ import annotations

import fnmatch
import re
import unicodedata
from collections.abc import Sequence

__all__ = ["BUILTIN_PII", "matches_pattern", "normalise_column_name", "pii_term"]

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
    """The built-in PII term ``column`` matches, or None (see the module docstring)."""
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
