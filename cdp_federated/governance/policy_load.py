"""Reading and validating a policy document; :func:`~.policy.load_policy` is the entry point.

Validation happens once, at the boundary, in three passes, and every error carries the line of the
YAML it is about:

1. YAML syntax (PyYAML's marks give line and column), plus duplicate keys, which PyYAML would
   otherwise resolve silently by keeping the last one;
2. the published JSON Schema (``policy_schema.json``, Draft 2020-12, every object closed with
   ``additionalProperties: false`` so a misspelt key is an error);
3. semantic checks the schema cannot express (contradictions between sections), in
   :mod:`.policy_checks`.

All errors of a file are reported together in one :class:`PolicySchemaError`, as
``(line, "dotted.path", message)`` triples. :func:`normalise_document` and
:func:`canonical_bytes` give the document :attr:`~.policy.Policy.content_hash` hashes.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterator, Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from ..errors import PolicySchemaError
from .policy_checks import JsonPath, semantic_errors

__all__ = ["canonical_bytes", "normalise_document", "policy_schema", "read_validated"]


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


def read_validated(path_or_text: str | Path) -> tuple[dict[str, Any], str]:
    """(document, source) of a policy that passed every check (see the module docstring);
    :class:`PolicySchemaError` listing every error with its line otherwise."""
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
    errors.extend(semantic_errors(data, strict=not schema_errors))
    if errors:
        _raise(source, [(_line_of(root, path), _dotted(path), msg) for path, msg in errors])
    return data, source


def _read(path_or_text: str | Path) -> tuple[str, str]:
    if isinstance(path_or_text, Path):
        return _read_file(path_or_text), str(path_or_text)
    text = path_or_text
    if (
        "\n" not in text
        and not text.lstrip().startswith("{")
        and (text.endswith((".yaml", ".yml", ".json")) or _is_file(text))
    ):
        return _read_file(Path(text)), text
    return text, "<text>"


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except OSError:  # e.g. a one-line document longer than a file name may be
        return False


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


# --- Normalisation and hash ------------------------------------------------------------------------


def _sorted(values: Any) -> list[Any]:
    return sorted(values or [])


def normalise_document(data: Mapping[str, Any]) -> dict[str, Any]:
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
            # only when set, so the hashes of policies without it stay what they were
            **(
                {"participants_per_round": int(data["minimums"]["participants_per_round"])}
                if data["minimums"].get("participants_per_round") is not None
                else {}
            ),
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


def canonical_bytes(document: Mapping[str, Any]) -> bytes:
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
