"""Connector contract: how data sources are declared, resolved and read.

A connector turns a declared source into a polars ``LazyFrame`` that honours this schema contract:

* ``profile_id`` (String): the source's ``id_column``, renamed; nulls dropped.
* each declared feature column, cast to Float64 (numeric and boolean sources only);
* the ``label`` column when declared, cast to Float64;
* ``jurisdiction`` (String) when ``jurisdiction_column`` is declared.

No other columns are returned. A missing column is a :class:`MissingColumnError` listing the
columns available; a non-numeric feature is a :class:`ColumnTypeError`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import polars as pl
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from .errors import (
    ColumnTypeError,
    ConfigError,
    ConnectorError,
    MissingColumnError,
    PluginError,
    SourceUnavailableError,
    UnknownConnectorError,
)

if TYPE_CHECKING:
    import pluggy
    from sqlalchemy import Select

__all__ = [
    "ConnectorConfig",
    "Connector",
    "AllowedIds",
    "ScanRequest",
    "ConnectorRegistry",
    "load_connector_configs",
    "conform",
    "apply_request",
    "PROFILE_ID",
    "JURISDICTION",
]

PROFILE_ID = "profile_id"
JURISDICTION = "jurisdiction"


class ConnectorConfig(BaseModel):
    """A source as declared in YAML (or built in code)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    name: str = "source"
    path: str | None = None  # csv, parquet, segment
    url: str | None = None  # sql: SQLAlchemy URL (a bare path means SQLite)
    table: str | None = None  # sql
    query: str | None = None  # sql: a SELECT used as a subquery
    frame: str | None = None  # frames: name the frame was registered under
    id_column: str = PROFILE_ID
    features: tuple[str, ...] | None = None  # None: every numeric column but id/label
    label: str | None = None
    jurisdiction_column: str | None = None
    options: dict[str, Any] = {}

    @model_validator(mode="after")
    def _sql_source(self) -> ConnectorConfig:
        if self.table and self.query:
            raise ValueError("give either 'table' or 'query', not both")
        return self


class AllowedIds(Protocol):
    """The consent layer's answer for one purpose at one time: the profile ids allowed.

    ``database_url`` is where the ledger lives; a SQL connector on the same database pushes
    :meth:`as_sql` down as a semi-join, any other connector semi-joins :meth:`as_frame`.
    """

    database_url: str | None

    def as_sql(self) -> Select: ...

    def as_frame(self) -> pl.LazyFrame: ...


@dataclass(frozen=True)
class ScanRequest:
    """What a reader wants from a source: consent-allowed ids and plugins' predicates (ANDed)."""

    allowed_ids: AllowedIds | None = None
    predicates: tuple[pl.Expr, ...] = field(default_factory=tuple)


class Connector(ABC):
    """Base class for connectors. Subclasses set ``type_name`` and implement :meth:`_source`."""

    type_name: ClassVar[str]
    required: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: ConnectorConfig) -> None:
        missing = [key for key in self.required if getattr(config, key) in (None, "")]
        if missing:
            raise ConfigError(
                f"connector type {config.type!r} needs {', '.join(missing)}",
                field=f"{config.name}.{missing[0]}",
                value=None,
                fix=f"add '{missing[0]}:' to the source declaration",
            )
        self.config = config

    @abstractmethod
    def _source(self) -> pl.LazyFrame:
        """The raw source as a LazyFrame (all columns, source types)."""

    def scan(self, request: ScanRequest | None = None) -> pl.LazyFrame:
        """The source under the schema contract, filtered by ``request``."""
        return apply_request(conform(self._source(), self.config), request)

    def available_columns(self) -> dict[str, str]:
        return {k: str(v) for k, v in self._source().collect_schema().items()}

    def close(self) -> None:
        """Release resources (engines, handles). Safe to call twice."""
        return None  # file and frame connectors hold nothing open

    def __enter__(self) -> Connector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_numeric(dtype: pl.DataType) -> bool:
    return dtype.is_numeric() or dtype == pl.Boolean


def _location(config: ConnectorConfig) -> str | None:
    from .store import redact_url  # a URL may carry a password: never echo it

    return (
        config.path
        or (redact_url(config.url) if config.url else None)
        or config.table
        or config.frame
    )


def conform(lf: pl.LazyFrame, config: ConnectorConfig) -> pl.LazyFrame:
    """Project, rename and cast ``lf`` to the schema contract; fail early naming columns."""
    try:
        schema = lf.collect_schema()
    except OSError as exc:
        raise SourceUnavailableError(
            f"cannot read source: {exc}",
            field=f"{config.name}.path",
            value=_location(config),
            fix="check the location and that it is readable",
        ) from exc
    except pl.exceptions.PolarsError as exc:
        raise ConnectorError(
            f"cannot read source: {exc}",
            field=f"{config.name}.path",
            value=_location(config),
            fix="check the location and the file format",
        ) from exc
    available = list(schema.names())
    wanted = [config.id_column]
    if config.label:
        wanted.append(config.label)
    if config.jurisdiction_column:
        wanted.append(config.jurisdiction_column)
    features = (
        list(config.features)
        if config.features is not None
        else [name for name in available if name not in wanted and _is_numeric(schema[name])]
    )
    for name in [*wanted, *features]:
        if name not in schema:
            raise MissingColumnError(
                f"column {name!r} not found in source {config.name!r}",
                field=name,
                value=_location(config),
                fix=f"use one of the available columns: {', '.join(available)}",
            )
    for name in features + ([config.label] if config.label else []):
        if not _is_numeric(schema[name]):
            raise ColumnTypeError(
                f"column {name!r} of source {config.name!r} is {schema[name]}, not numeric",
                field=name,
                value=str(schema[name]),
                fix="encode it numerically upstream or leave it out of 'features'",
            )
    exprs = [pl.col(config.id_column).cast(pl.String).alias(PROFILE_ID)]
    exprs += [pl.col(name).cast(pl.Float64) for name in features]
    if config.label:
        exprs.append(pl.col(config.label).cast(pl.Float64))
    if config.jurisdiction_column:
        exprs.append(pl.col(config.jurisdiction_column).cast(pl.String).alias(JURISDICTION))
    return lf.select(exprs).filter(pl.col(PROFILE_ID).is_not_null())


def apply_request(lf: pl.LazyFrame, request: ScanRequest | None) -> pl.LazyFrame:
    """Semi-join the allowed ids and AND the plugins' predicates (polars side)."""
    if request is None:
        return lf
    if request.allowed_ids is not None:
        lf = lf.join(request.allowed_ids.as_frame(), on=PROFILE_ID, how="semi")
    for predicate in request.predicates:
        lf = lf.filter(predicate)
    return lf


def load_connector_configs(path: str | Path) -> list[ConnectorConfig]:
    """Read source declarations from YAML: a mapping ``sources: {name: {type: ..., ...}}`` or a
    list of mappings each with a ``name``."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(
            "cannot read sources file", field="path", value=str(path), fix="check the path"
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"invalid YAML: {exc}", field="path", value=str(path), fix="fix the YAML syntax"
        ) from exc
    items: Iterable[tuple[str | None, Any]]
    raw = data.get("sources") if isinstance(data, dict) else data
    if isinstance(raw, dict):
        items = raw.items()
    elif isinstance(raw, list):
        items = [(None, item) for item in raw]
    else:
        raise ConfigError(
            "sources file must hold 'sources:' as a mapping or list",
            field="sources",
            value=type(raw).__name__,
            fix="see README: Connectors",
        )
    configs = []
    for name, body in items:
        if not isinstance(body, dict):
            raise ConfigError(
                "each source must be a mapping",
                field=str(name),
                value=body,
                fix="see README: Connectors",
            )
        body = dict(body)
        if name is not None:
            body.setdefault("name", name)
        configs.append(parse_config(body))
    return configs


def parse_config(body: dict[str, Any]) -> ConnectorConfig:
    try:
        return ConnectorConfig.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "source"
        raise ConfigError(
            f"invalid source declaration: {first['msg']}",
            field=f"{body.get('name', 'source')}.{loc}",
            value=first.get("input"),
            fix="see README: Connectors for the accepted keys",
        ) from exc


class ConnectorRegistry:
    """Connector classes collected through ``cdp_register_connectors``."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._types: dict[str, type[Connector]] = {}
        owners: dict[str, str] = {}
        for plugin_result in pm.hook.cdp_register_connectors():
            for cls in plugin_result or ():
                name = cls.type_name
                owner = cls.__module__
                if name in self._types and self._types[name] is not cls:
                    raise PluginError(
                        f"connector type {name!r} is registered twice",
                        field="type_name",
                        value=name,
                        fix=f"rename one of the connectors in {owners[name]} and {owner}",
                    )
                self._types[name] = cls
                owners[name] = owner

    @property
    def types(self) -> Sequence[str]:
        return sorted(self._types)

    def open(self, config: ConnectorConfig | dict[str, Any]) -> Connector:
        if isinstance(config, dict):
            config = parse_config(config)
        try:
            cls = self._types[config.type]
        except KeyError:
            raise UnknownConnectorError(
                f"no connector handles type {config.type!r}",
                field=f"{config.name}.type",
                value=config.type,
                fix=f"use one of: {', '.join(self.types) or '(none registered)'}",
            ) from None
        return cls(config)
