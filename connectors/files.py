"""CSV (``type: csv``) and Parquet (``type: parquet``) connectors, read lazily with polars.

``path`` is required and may be a glob (``exports/part-*.parquet``): the matching files are read as
one frame, so they must share their columns.
CSV options (``options:``) map onto ``polars.scan_csv`` keywords: ``separator``, ``has_header``,
``null_values``, ``comment_prefix``, ``quote_char``, ``skip_rows``, ``encoding``,
``infer_schema_length``, ``decimal_comma``, ``ignore_errors``, ``truncate_ragged_lines``.
Parquet accepts ``hive_partitioning``. Any other option name is a :class:`ConfigError`.

A missing or unreadable file is a :class:`SourceUnavailableError` naming the path, raised at the
first schema read (``scan()``/``available_columns()``), not later inside a training round.
"""

from __future__ import annotations

import glob
import os
from abc import abstractmethod
from pathlib import Path
from typing import ClassVar

import polars as pl

from cdp_federated.connector import Connector, ConnectorConfig
from cdp_federated.errors import ConfigError, ConnectorError, SourceUnavailableError
from cdp_federated.hookspecs import hookimpl

__all__ = ["CsvConnector", "ParquetConnector", "cdp_register_connectors"]

_GLOB_CHARS = frozenset("*?[")


class _FileConnector(Connector):
    """Shared logic: option validation, path checks and mapping polars' I/O errors."""

    required: ClassVar[tuple[str, ...]] = ("path",)
    options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__(config)
        unknown = sorted(set(config.options) - self.options)
        if unknown:
            raise ConfigError(
                f"unknown {self.type_name} connector option",
                field=f"{config.name}.options.{unknown[0]}",
                value=unknown,
                fix=f"use only {', '.join(sorted(self.options))}",
            )
        self.path: str = os.path.expanduser(config.path)  # type: ignore[arg-type]  # required
        self._lazy: pl.LazyFrame | None = None

    @abstractmethod
    def _scan(self) -> pl.LazyFrame:
        """Build the polars scan (no I/O yet)."""

    def _unavailable(self, reason: str) -> SourceUnavailableError:
        return SourceUnavailableError(
            f"cannot read {self.type_name} source {self.config.name!r}: {reason}",
            field=f"{self.config.name}.path",
            value=self.path,
            fix="check that the path exists and is readable by this process",
        )

    def _check_local_path(self) -> None:
        # Remote URLs (s3://, https://) are left to polars; local paths get a clear message early.
        if "://" in self.path:
            return
        if _GLOB_CHARS & set(self.path):
            if not glob.glob(self.path, recursive=True):
                raise self._unavailable("no file matches the pattern")
        elif not Path(self.path).is_file():
            reason = "it is a directory" if Path(self.path).is_dir() else "no such file"
            raise self._unavailable(reason)

    def _source(self) -> pl.LazyFrame:
        if self._lazy is None:
            self._check_local_path()
            try:
                lazy = self._scan()
                lazy.collect_schema()  # first read: surfaces permission and format errors now
            except (TypeError, ValueError) as exc:  # polars rejects an option's value
                raise ConfigError(
                    f"invalid {self.type_name} option: {exc}",
                    field=f"{self.config.name}.options",
                    value=self.config.options,
                    fix=f"see polars.scan_{self.type_name} for accepted values",
                ) from exc
            except OSError as exc:
                raise self._unavailable(exc.strerror or str(exc)) from exc
            except pl.exceptions.PolarsError as exc:
                raise ConnectorError(
                    f"{self.config.name!r} is not a readable {self.type_name} file: {exc}",
                    field=f"{self.config.name}.path",
                    value=self.path,
                    fix=f"check the file format (and options) of {self.path}",
                ) from exc
            self._lazy = lazy
        return self._lazy


class CsvConnector(_FileConnector):
    type_name: ClassVar[str] = "csv"
    options: ClassVar[frozenset[str]] = frozenset(
        {
            "separator",
            "has_header",
            "null_values",
            "comment_prefix",
            "quote_char",
            "skip_rows",
            "encoding",
            "infer_schema_length",
            "decimal_comma",
            "ignore_errors",
            "truncate_ragged_lines",
        }
    )

    def _scan(self) -> pl.LazyFrame:
        # Ids stay text: inferring "007" as an integer would turn it into "7" and break joins
        # with the consent ledger and identity store.
        overrides = {self.config.id_column: pl.String}
        if self.config.jurisdiction_column:
            overrides[self.config.jurisdiction_column] = pl.String
        return pl.scan_csv(self.path, schema_overrides=overrides, **self.config.options)


class ParquetConnector(_FileConnector):
    type_name: ClassVar[str] = "parquet"
    options: ClassVar[frozenset[str]] = frozenset({"hive_partitioning"})

    def _scan(self) -> pl.LazyFrame:
        return pl.scan_parquet(self.path, **self.config.options)


@hookimpl
def cdp_register_connectors() -> list[type[Connector]]:
    return [CsvConnector, ParquetConnector]
