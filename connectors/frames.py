"""In-memory frames (``type: frame``): a host registers a pandas or polars frame under a name and
declares a source with ``frame: <name>``.

Registration happens in code (``register_frame("orders", df)``) because a frame cannot be written
in YAML. A pandas frame is converted once, at registration, so later changes to it are not seen;
its index is not kept (``reset_index()`` first if the ids live there).
"""

from __future__ import annotations

import threading
from typing import Any, ClassVar

import polars as pl

from cdp_federated.connector import Connector, ConnectorConfig
from cdp_federated.errors import ConfigError, ConnectorError
from cdp_federated.hookspecs import hookimpl

__all__ = [
    "FrameConnector",
    "register_frame",
    "unregister_frame",
    "registered_frames",
    "cdp_register_connectors",
]

_FRAMES: dict[str, pl.LazyFrame] = {}
_LOCK = threading.Lock()  # hosts may register from several threads (web workers, schedulers)


def _is_pandas_frame(frame: Any) -> bool:
    """Without importing pandas (half a second) unless the frame came from it."""
    if not type(frame).__module__.startswith("pandas"):
        return False
    import pandas as pd

    return isinstance(frame, pd.DataFrame)


def register_frame(name: str, frame: Any) -> None:
    """Make ``frame`` (pandas DataFrame, polars DataFrame or LazyFrame) available as ``name``.

    Registering a name again replaces the previous frame.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(
            "a frame needs a non-empty string name",
            field="name",
            value=name,
            fix="register_frame('orders', df)",
        )
    if isinstance(frame, pl.LazyFrame):
        lazy = frame
    elif isinstance(frame, pl.DataFrame):
        lazy = frame.lazy()
    elif _is_pandas_frame(frame):
        # from_pandas shares numpy buffers; copy so later edits to the pandas frame are not seen
        lazy = pl.from_pandas(frame.copy(deep=True)).lazy()
    else:
        raise ConfigError(
            f"frame {name!r} is a {type(frame).__module__}.{type(frame).__qualname__}",
            field="frame",
            value=name,
            fix="pass a pandas.DataFrame, polars.DataFrame or polars.LazyFrame",
        )
    with _LOCK:
        _FRAMES[name] = lazy


def unregister_frame(name: str) -> None:
    """Forget ``name``; forgetting an unknown name does nothing (safe in teardown code)."""
    with _LOCK:
        _FRAMES.pop(name, None)


def registered_frames() -> list[str]:
    with _LOCK:
        return sorted(_FRAMES)


class FrameConnector(Connector):
    """Reads a registered frame; the frame is looked up when the connector is opened."""

    type_name: ClassVar[str] = "frame"
    required: ClassVar[tuple[str, ...]] = ("frame",)

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__(config)
        with _LOCK:
            lazy = _FRAMES.get(config.frame)  # type: ignore[arg-type]  # required above
            names = sorted(_FRAMES)
        if lazy is None:
            raise ConnectorError(
                f"no frame is registered as {config.frame!r}",
                field=f"{config.name}.frame",
                value=config.frame,
                fix=f"call register_frame({config.frame!r}, df) first, or use one of: "
                + (", ".join(names) or "(none registered)"),
            )
        self._lazy = lazy

    def _source(self) -> pl.LazyFrame:
        return self._lazy


@hookimpl
def cdp_register_connectors() -> list[type[Connector]]:
    return [FrameConnector]
