"""Round-level helpers of a training job: client sampling, early stopping, the validation hold-out.

All three are deterministic given their key or inputs, so a job is reproducible when its spec
carries a seed, and keyed by fresh randomness from :mod:`secrets` when it does not. None of them
uses ``random`` or ``numpy.random``: a draw is a ranking by a keyed BLAKE2b hash.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from ..errors import ConfigError

__all__ = [
    "ClientSampler",
    "EarlyStopping",
    "validation_fraction",
    "validation_secret",
    "validation_mask",
]

DEFAULT_VALIDATION_FRACTION = 0.1

_KEY_BYTES = 32


def _seed_key(seed: int | str, purpose: bytes) -> bytes:
    return hashlib.blake2b(f"{seed}".encode(), person=purpose, digest_size=_KEY_BYTES).digest()


class ClientSampler:
    """Draws the participants of each round: ``count`` of them, or ``ceil(fraction * n)``.

    The draw ranks participants by ``BLAKE2b(key, round || name)`` and keeps the lowest, so for a
    given key it is a uniform random subset per round, reproducible from ``seed`` (the job spec's)
    or unpredictable when the key comes from :mod:`secrets`. At least one participant is drawn.
    """

    STATE_KEYS: ClassVar[tuple[str, ...]] = ("sampler_key",)

    def __init__(
        self,
        *,
        fraction: float | None = None,
        count: int | None = None,
        seed: int | str | None = None,
    ) -> None:
        if (fraction is None) == (count is None):
            raise ConfigError(
                "client sampling needs exactly one of a fraction or a count",
                field="params.fraction_fit",
                value={"fraction_fit": fraction, "clients_per_round": count},
                fix="set params.fraction_fit (0 < f <= 1) or params.clients_per_round, not both",
            )
        if fraction is not None and not (
            isinstance(fraction, int | float)
            and not isinstance(fraction, bool)
            and 0 < fraction <= 1
        ):
            raise ConfigError(
                "fraction_fit must be in (0, 1]",
                field="params.fraction_fit",
                value=fraction,
                fix="use for example 0.5 to ask half the participants each round",
            )
        if count is not None and not (
            isinstance(count, int) and not isinstance(count, bool) and count >= 1
        ):
            raise ConfigError(
                "clients_per_round must be a positive integer",
                field="params.clients_per_round",
                value=count,
                fix="use a whole number of participants per round",
            )
        self.fraction = fraction
        self.count = count
        self.key = (
            _seed_key(seed, b"cdpfl-sample")
            if seed is not None
            else secrets.token_bytes(_KEY_BYTES)
        )

    def size(self, available: int) -> int:
        """How many of ``available`` participants a round asks."""
        wanted = self.count if self.count is not None else math.ceil(self.fraction * available)
        return max(1, min(int(wanted), available))

    def sample(self, round_number: int, participants: Sequence[str]) -> list[str]:
        """The participants asked in round ``round_number``, sorted by name."""
        ranked = sorted(
            participants,
            key=lambda name: hashlib.blake2b(
                f"{round_number}\x00{name}".encode(), key=self.key, digest_size=16
            ).digest(),
        )
        return sorted(ranked[: self.size(len(participants))])

    def state_dict(self) -> dict[str, Any]:
        return {"sampler_key": self.key.hex()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "sampler_key" in state:
            try:
                key = bytes.fromhex(state["sampler_key"])
            except (TypeError, ValueError):
                key = b""
            if len(key) != _KEY_BYTES:
                raise ConfigError(
                    "sampler key must be 32 bytes of hex",
                    field="strategy_state.sampler_key",
                    fix="resume from a checkpoint written by state_dict()",
                )
            self.key = key


class EarlyStopping:
    """Stops training when the validation loss has not improved by more than ``min_delta`` for
    ``patience`` consecutive checks, and remembers the best parameters seen.

    :meth:`update` takes the loss *of the parameters passed with it*; the caller keeps training
    while it returns ``False``.
    """

    def __init__(self, *, patience: int, min_delta: float = 0.0) -> None:
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise ConfigError(
                "patience must be a positive integer",
                field="params.patience",
                value=patience,
                fix="use for example 3 (checks without improvement before stopping)",
            )
        if (
            not isinstance(min_delta, int | float)
            or isinstance(min_delta, bool)
            or not (np.isfinite(min_delta) and min_delta >= 0)
        ):
            raise ConfigError(
                "min_delta must be a finite number >= 0",
                field="params.min_delta",
                value=min_delta,
                fix="use 0 or a small positive improvement such as 1e-4",
            )
        self.patience = patience
        self.min_delta = float(min_delta)
        self.best_loss = float("inf")
        self.best_round = 0
        self.best_parameters: np.ndarray | None = None
        self.waited = 0

    def update(self, round_number: int, loss: float, parameters: np.ndarray) -> bool:
        """Record ``loss`` of ``parameters`` (the model after ``round_number`` rounds); returns
        whether to stop. A NaN loss (nobody could validate) counts as no improvement."""
        if loss < self.best_loss - self.min_delta:
            self.best_loss = float(loss)
            self.best_round = round_number
            self.best_parameters = np.array(parameters, dtype=np.float64)
            self.waited = 0
        else:
            self.waited += 1
        return self.waited >= self.patience

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "best_loss": self.best_loss if np.isfinite(self.best_loss) else None,
            "best_round": self.best_round,
            "waited": self.waited,
        }
        if self.best_parameters is not None:
            state["best_parameters"] = self.best_parameters.copy()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        loss = state.get("best_loss")
        self.best_loss = float("inf") if loss is None else float(loss)
        self.best_round = int(state.get("best_round", 0))
        self.waited = int(state.get("waited", 0))
        best = state.get("best_parameters")
        self.best_parameters = None if best is None else np.array(best, dtype=np.float64)


def validation_fraction(params: Mapping[str, Any]) -> float:
    """Share of each participant's training rows held out for validation: ``params.validation_fraction``,
    else 0.1 when early stopping is on (``params.patience``), else 0."""
    default = DEFAULT_VALIDATION_FRACTION if params.get("patience") is not None else 0.0
    value = params.get("validation_fraction", default)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1
    if not ok or (params.get("patience") is not None and value == 0):
        raise ConfigError(
            "validation_fraction must be in [0, 1), and above 0 with early stopping",
            field="params.validation_fraction",
            value=value,
            fix="use for example 0.1, or leave it out (0.1 with params.patience, else 0)",
        )
    return float(value)


def validation_secret(job_id: str, seed: Any = None) -> bytes:
    """Key of the validation hold-out: the same for every participant and round of a job."""
    return _seed_key(f"{job_id}\x00{seed}", b"cdpfl-holdout")


def validation_mask(keys: Sequence[str] | np.ndarray, fraction: float, secret: bytes) -> np.ndarray:
    """Boolean mask of the rows held out for validation: those whose keyed hash
    ``BLAKE2b(secret, key)`` falls below ``fraction`` of the hash range.

    The same key always lands on the same side for a given ``secret``, so a row stays in its split
    across rounds, reloads and consent re-checks, and the split does not depend on row order."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    cut = int(fraction * 2**64)
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(str(k).encode(), key=secret, digest_size=8).digest())
            < cut
            for k in keys
        ),
        dtype=bool,
        count=len(keys),
    )
