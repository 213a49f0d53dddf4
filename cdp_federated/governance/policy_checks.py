"""Semantic checks of a policy document: contradictions between sections that the JSON Schema
cannot express (third validation pass, see :mod:`.policy_load`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .pii import _GLOB, pii_term

__all__ = ["JsonPath", "PathPart", "region_matches", "semantic_errors"]

PathPart = str | int
JsonPath = tuple[PathPart, ...]


def region_matches(value: str, prefixes: Sequence[str]) -> str | None:
    """The first prefix ``value`` falls under, case-insensitively: ``EU`` covers ``EU`` and
    ``eu-west`` (never ``EUX``). None when none does."""
    upper = value.upper()
    for prefix in prefixes:
        p = prefix.upper()
        if upper == p or upper.startswith(p + "-"):
            return prefix
    return None


_GUARDED = (TypeError, KeyError, AttributeError, ValueError, IndexError)


def semantic_errors(data: dict[str, Any], *, strict: bool) -> list[tuple[JsonPath, str]]:
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
