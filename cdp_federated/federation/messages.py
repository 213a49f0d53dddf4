"""Typed federation messages: frozen dataclasses, each registered with a wire type name and version.

A message's fields are either *arrays* (numpy arrays, sent as raw little-endian buffers) or
*scalars* (``int``, ``float``, ``str``, ``bool``, JSON-safe ``dict``/``list``, sent in the JSON
header). Registration records which is which and which array dtype kinds a field accepts, so the
codec can refuse anything else at the boundary. Every float array must be finite on the wire: a
participant must not be able to poison a model (or an aggregate) with NaN or Inf.

The federation layer knows no algorithm: the fields below say what travels, not how it is used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "Message",
    "MESSAGE_TYPES",
    "register",
    "StatsIns",
    "StatsRes",
    "FitIns",
    "setup_digest",
    "FitRes",
    "EvaluateIns",
    "EvaluateRes",
    "RegressionEvaluateRes",
    "PersonalizeIns",
    "PersonalizeRes",
    "Failure",
    "GBMSketchIns",
    "GBMSketchRes",
    "GBMHistogramIns",
    "GBMHistogramRes",
    "GBMCatchUpIns",
    "GBMCatchUpRes",
    "GBMEvaluateIns",
    "GBMEvaluateRes",
    "QuantisedFitRes",
    "SparseFitRes",
    "SecAggIns",
    "SecAggRes",
    "SecAggShare",
]

# Array dtype kinds a field may declare: floats, or integer counts (signed or unsigned), or bools.
FLOAT, INTEGER, BOOLEAN = "f", "iu", "b"
_SCALAR_KINDS = {int: "int", float: "float", str: "str", bool: "bool", dict: "dict", list: "list"}


class Message:
    """Base of every wire message. Subclasses are frozen dataclasses decorated with :func:`register`."""

    TYPE: ClassVar[str]
    VERSION: ClassVar[int]
    ARRAYS: ClassVar[Mapping[str, str]]  # array field -> accepted dtype kinds
    SCALARS: ClassVar[Mapping[str, str]]  # scalar field -> "int" | "float" | "str" | ...


MESSAGE_TYPES: dict[str, type[Message]] = {}


def _scalar_kind(cls: type, name: str, hint: Any) -> str:
    origin = typing.get_origin(hint) or hint
    kind = _SCALAR_KINDS.get(origin)
    if kind is None:
        raise TypeError(f"{cls.__name__}.{name}: unsupported wire type {hint!r}")
    return kind


def register(
    type_name: str,
    *,
    version: int,
    arrays: Mapping[str, str] | None = None,
    registry: dict[str, type[Message]] | None = None,
) -> Callable[[type[Message]], type[Message]]:
    """Class decorator: register a frozen dataclass as wire type ``type_name`` at ``version``.

    ``arrays`` maps each array field to the dtype kinds it accepts (``"f"`` floats, ``"iu"``
    integers, ``"b"`` booleans); every other field is a scalar typed by its annotation.
    ``registry`` defaults to :data:`MESSAGE_TYPES` (tests pass their own).
    """
    target = MESSAGE_TYPES if registry is None else registry
    array_kinds = dict(arrays or {})

    def decorate(cls: type[Message]) -> type[Message]:
        if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            raise TypeError(f"{cls.__name__} must be a frozen dataclass")
        if type_name in target and target[type_name] is not cls:
            raise TypeError(f"message type {type_name!r} is already registered")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = set(array_kinds) - set(names)
        if unknown:
            raise TypeError(f"{cls.__name__}: array fields {sorted(unknown)} are not fields")
        cls.TYPE = type_name
        cls.VERSION = version
        cls.ARRAYS = array_kinds
        cls.SCALARS = {n: _scalar_kind(cls, n, hints[n]) for n in names if n not in array_kinds}
        target[type_name] = cls
        return cls

    return decorate


def _empty() -> np.ndarray:
    return np.zeros(0)


# --- Federated standardisation -------------------------------------------------------------------


@register("stats_ins", version=1)
@dataclasses.dataclass(frozen=True, eq=False)
class StatsIns(Message):
    """Ask a participant for the moments of its ``split`` of ``job`` (a ``JobSpec.to_dict()``)."""

    job: dict[str, Any]
    split: str = "train"


@register(
    "stats_res",
    version=2,
    arrays={"sums": FLOAT, "scatter": FLOAT},
)
@dataclasses.dataclass(frozen=True, eq=False)
class StatsRes(Message):
    """Aggregate moments of one participant's rows (never a row).

    ``sums[j]`` is the sum of feature ``j``; ``scatter`` (d x d) the sum of outer products of the
    rows' deviations from this participant's own mean (its diagonal is the per-feature sum of
    squared deviations), which combines across parties without cancellation error.
    ``label_positives`` is the sum of the label (the positives of a 0/1 label) and
    ``label_scatter`` the sum of its squared deviations from this participant's label mean.
    """

    count: int
    sums: np.ndarray
    scatter: np.ndarray
    label_positives: float
    label_scatter: float = 0.0


# --- Training ------------------------------------------------------------------------------------


@register(
    "fit_ins",
    version=2,
    arrays={"parameters": FLOAT, "mean": FLOAT, "scale": FLOAT, "preconditioner": FLOAT},
)
@dataclasses.dataclass(frozen=True, eq=False)
class FitIns(Message):
    """Train locally for round ``round`` starting from ``parameters``.

    Features are standardised as ``(x - mean) / scale`` first. ``preconditioner`` is a square
    matrix applied to local gradients (empty: plain gradient steps). ``config`` holds the task's
    scalar settings (learning rate, local steps, regularisation...).

    ``setup`` names the job's *setup* (the job spec, mean, scale and preconditioner, which do not
    change between rounds) by :func:`setup_digest`. A *full* request carries all of them and
    ``setup`` (the participant keeps them under that name); a *short* one carries only
    ``{"job_id": ...}`` as ``job``, empty ``mean``/``scale``/``preconditioner`` and ``setup``, and
    a participant that does not hold that setup (it restarted) fails with ``SetupRequiredError``
    so the coordinator sends the full request again. ``setup=""``: a full request, not kept.
    """

    job: dict[str, Any]
    round: int
    parameters: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    config: dict[str, Any]
    preconditioner: np.ndarray = dataclasses.field(default_factory=_empty)
    setup: str = ""

    @property
    def is_short(self) -> bool:
        """Whether the setup is left out (to be taken from the participant's cache)."""
        return bool(self.setup) and not self.mean.size


def setup_digest(
    job: Mapping[str, Any], mean: np.ndarray, scale: np.ndarray, preconditioner: np.ndarray
) -> str:
    """Name of a job's setup: SHA-256 over the canonical JSON of the job spec and the arrays'
    float64 little-endian bytes and shapes. Both sides compute it, so a participant can check
    that a full request's setup is the one it names."""
    digest = hashlib.sha256(json.dumps(job, sort_keys=True, separators=(",", ":")).encode())
    for array in (mean, scale, preconditioner):
        array = np.ascontiguousarray(array, dtype="<f8")
        digest.update(repr(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


@register("fit_res", version=1, arrays={"parameters": FLOAT})
@dataclasses.dataclass(frozen=True, eq=False)
class FitRes(Message):
    """Locally updated ``parameters``, the ``num_examples`` they were trained on, and scalar
    ``metrics`` about the round (for example the incoming model's mean training loss)."""

    parameters: np.ndarray
    num_examples: int
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)


# --- Evaluation ----------------------------------------------------------------------------------


@register(
    "evaluate_ins",
    version=1,
    arrays={"parameters": FLOAT, "mean": FLOAT, "scale": FLOAT},
)
@dataclasses.dataclass(frozen=True, eq=False)
class EvaluateIns(Message):
    """Score the ``split`` rows with ``parameters`` and report ``bins`` score histograms."""

    job: dict[str, Any]
    split: str
    parameters: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    bins: int


@register("evaluate_res", version=1, arrays={"positives": INTEGER, "negatives": INTEGER})
@dataclasses.dataclass(frozen=True, eq=False)
class EvaluateRes(Message):
    """Per-class score histograms: ``positives[i]`` / ``negatives[i]`` count rows with label 1 / 0
    whose score falls in bin ``i`` of ``bins`` equal-width bins over [0, 1]. Plus the summed
    log loss and the row count. Never per-row scores."""

    positives: np.ndarray
    negatives: np.ndarray
    log_loss_sum: float
    count: int


@register("regression_evaluate_res", version=1)
@dataclasses.dataclass(frozen=True, eq=False)
class RegressionEvaluateRes(Message):
    """Sums that give RMSE, MAE and R^2 of the pooled rows: squared and absolute errors of the
    predictions, the label's sum and its scatter about this participant's label mean (which
    combine across parties like :class:`StatsRes` moments), and the row count. Never a row."""

    count: int
    squared_error_sum: float
    absolute_error_sum: float
    label_sum: float
    label_scatter: float


# --- Personalisation -----------------------------------------------------------------------------


@register(
    "personalize_ins",
    version=1,
    arrays={"parameters": FLOAT, "mean": FLOAT, "scale": FLOAT, "preconditioner": FLOAT},
)
@dataclasses.dataclass(frozen=True, eq=False)
class PersonalizeIns(Message):
    """Fine-tune the global ``parameters`` on this participant's training rows (``config`` as in
    :class:`FitIns`, ``steps`` local steps), keep the result locally and evaluate both models on
    the local test split. The personalised parameters never leave the participant."""

    job: dict[str, Any]
    parameters: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    config: dict[str, Any]
    steps: int
    preconditioner: np.ndarray = dataclasses.field(default_factory=_empty)


@register("personalize_res", version=1)
@dataclasses.dataclass(frozen=True, eq=False)
class PersonalizeRes(Message):
    """Aggregate test metrics of the global and the personalised model on this participant's
    test rows (``{"global": {...}, "personalised": {...}}``) and the row count."""

    count: int
    metrics: dict[str, Any]


# --- Errors --------------------------------------------------------------------------------------


@register("failure", version=1)
@dataclasses.dataclass(frozen=True, eq=False)
class Failure(Message):
    """A participant could not serve a request: at which ``stage``, the error's type name and its
    one-line message (which, like every error text, must name no row or identifier)."""

    participant: str
    stage: str
    error_type: str
    message: str


# --- Histogram gradient boosting (horizontal) ----------------------------------------------------


@register("gbm_sketch_ins", version=1)
@dataclasses.dataclass(frozen=True, eq=False)
class GBMSketchIns(Message):
    """Ask for per-feature summaries of the training rows: distinct values with counts when a
    feature has at most ``exact_limit`` of them, else at most ``sketch_size`` chunk means with
    their row counts (each chunk holds several rows)."""

    job: dict[str, Any]
    sketch_size: int
    exact_limit: int


@register(
    "gbm_sketch_res",
    version=1,
    arrays={"values": FLOAT, "weights": FLOAT, "lengths": INTEGER, "exact": BOOLEAN},
)
@dataclasses.dataclass(frozen=True, eq=False)
class GBMSketchRes(Message):
    """Feature ``j``'s summary is ``values``/``weights`` at ``lengths[:j].sum()`` onwards for
    ``lengths[j]`` points, exact (distinct values) when ``exact[j]``. Plus the row count and
    the label sum (for the base score). Never a row."""

    count: int
    label_sum: float
    values: np.ndarray
    weights: np.ndarray
    lengths: np.ndarray
    exact: np.ndarray


def _empty_int() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


@register(
    "gbm_histogram_ins",
    version=1,
    arrays={
        "edges": FLOAT,
        "edge_counts": INTEGER,
        "split_nodes": INTEGER,
        "split_features": INTEGER,
        "split_bins": INTEGER,
        "leaf_nodes": INTEGER,
        "leaf_values": FLOAT,
        "build_nodes": INTEGER,
        "features": INTEGER,
    },
)
@dataclasses.dataclass(frozen=True, eq=False)
class GBMHistogramIns(Message):
    """One level of tree ``tree``, which is also the split broadcast of the previous level.

    The participant (1) moves the rows of each ``split_nodes[i]`` to child ``2k+1`` when their
    bin of ``split_features[i]`` is at most ``split_bins[i]``, else ``2k+2``; (2) when
    ``leaf_nodes`` is non-empty, adds ``leaf_values`` to its rows' margins (the previous tree is
    complete); (3) when ``depth`` is 0, starts tree ``tree`` (row draw from ``seed``); (4) replies
    with gradient/hessian histograms of ``build_nodes`` over ``features``. The job's first
    request also carries the agreed bin ``edges`` (``edge_counts`` per feature) and the
    ``base_score`` every margin starts from.
    """

    job: dict[str, Any]
    tree: int
    depth: int
    seed: int
    base_score: float
    build_nodes: np.ndarray
    features: np.ndarray
    split_nodes: np.ndarray = dataclasses.field(default_factory=_empty_int)
    split_features: np.ndarray = dataclasses.field(default_factory=_empty_int)
    split_bins: np.ndarray = dataclasses.field(default_factory=_empty_int)
    leaf_nodes: np.ndarray = dataclasses.field(default_factory=_empty_int)
    leaf_values: np.ndarray = dataclasses.field(default_factory=_empty)
    edges: np.ndarray = dataclasses.field(default_factory=_empty)
    edge_counts: np.ndarray = dataclasses.field(default_factory=_empty_int)


@register("gbm_histogram_res", version=1, arrays={"nodes": INTEGER, "grad": FLOAT, "hess": FLOAT})
@dataclasses.dataclass(frozen=True, eq=False)
class GBMHistogramRes(Message):
    """Gradient and hessian sums of this participant's rows per (node, feature, bin): ``grad``
    and ``hess`` are ``len(nodes) x features x bins``. Never a row or a per-row gradient."""

    tree: int
    depth: int
    nodes: np.ndarray
    grad: np.ndarray
    hess: np.ndarray


@register(
    "gbm_catch_up_ins",
    version=1,
    arrays={
        "edges": FLOAT,
        "edge_counts": INTEGER,
        "split_counts": INTEGER,
        "split_nodes": INTEGER,
        "split_features": INTEGER,
        "split_bins": INTEGER,
        "leaf_counts": INTEGER,
        "leaf_nodes": INTEGER,
        "leaf_values": FLOAT,
    },
)
@dataclasses.dataclass(frozen=True, eq=False)
class GBMCatchUpIns(Message):
    """Rebuild a restarted participant's training state for the job's histogram request at
    ``tree``/``depth``: the bin ``edges`` and ``base_score`` of the first request, and the model
    so far in heap form, nothing per row. Tree ``t`` (``t < tree`` finished, ``t == tree`` the
    current one) has ``split_counts[t]`` splits, the next ones in ``split_*``; finished tree
    ``t`` has ``leaf_counts[t]`` leaves in ``leaf_*``. The participant re-reads its rows, replays
    the trees, draws the current tree's rows from ``seed`` and applies its splits, then answers
    :class:`GBMCatchUpRes`; the level's own request follows (answered as a repeat)."""

    job: dict[str, Any]
    tree: int
    depth: int
    seed: int
    base_score: float
    edges: np.ndarray
    edge_counts: np.ndarray
    split_counts: np.ndarray
    split_nodes: np.ndarray
    split_features: np.ndarray
    split_bins: np.ndarray
    leaf_counts: np.ndarray
    leaf_nodes: np.ndarray
    leaf_values: np.ndarray


@register("gbm_catch_up_res", version=1)
@dataclasses.dataclass(frozen=True, eq=False)
class GBMCatchUpRes(Message):
    """The participant holds the state for ``tree``/``depth`` again (no histograms: under
    secure aggregation those only ever leave masked)."""

    tree: int
    depth: int


@register(
    "gbm_evaluate_ins",
    version=1,
    arrays={
        "feature": INTEGER,
        "threshold": FLOAT,
        "left": INTEGER,
        "right": INTEGER,
        "value": FLOAT,
        "roots": INTEGER,
    },
)
@dataclasses.dataclass(frozen=True, eq=False)
class GBMEvaluateIns(Message):
    """Score the ``split`` rows with the tree ensemble (flat node arrays, ``roots`` per tree)
    and report aggregates: ``bins`` score histograms for a binary ``objective``, error sums for
    regression."""

    job: dict[str, Any]
    split: str
    objective: str
    base_score: float
    bins: int
    feature: np.ndarray
    threshold: np.ndarray
    left: np.ndarray
    right: np.ndarray
    value: np.ndarray
    roots: np.ndarray


@register("gbm_evaluate_res", version=1, arrays={"positives": INTEGER, "negatives": INTEGER})
@dataclasses.dataclass(frozen=True, eq=False)
class GBMEvaluateRes(Message):
    """Aggregates of one participant's scored rows: per-class score histograms (binary; empty for
    regression), summed log loss (binary), summed squared and absolute errors (regression), the
    label sum and the row count. Never per-row scores."""

    count: int
    log_loss_sum: float
    squared_error_sum: float
    absolute_error_sum: float
    label_sum: float
    positives: np.ndarray
    negatives: np.ndarray


# --- Compressed training updates (privacy/compression.py) ----------------------------------------


@register("quantised_fit_res", version=1, arrays={"codes": INTEGER, "scales": FLOAT})
@dataclasses.dataclass(frozen=True, eq=False)
class QuantisedFitRes(Message):
    """A :class:`FitRes` whose update (local minus global parameters, ``size`` coordinates) is
    quantised to ``bits`` (8, or 4 packed two per byte) in ``codes`` (uint8), with one float32
    scale per ``block`` coordinates in ``scales``."""

    codes: np.ndarray
    scales: np.ndarray
    bits: int
    block: int
    size: int
    num_examples: int
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)


@register("sparse_fit_res", version=1, arrays={"indices": INTEGER, "values": FLOAT})
@dataclasses.dataclass(frozen=True, eq=False)
class SparseFitRes(Message):
    """A :class:`FitRes` whose update (``size`` coordinates) is sparse: ``values`` (float32) at
    ``indices`` (int32), zero elsewhere."""

    indices: np.ndarray
    values: np.ndarray
    size: int
    num_examples: int
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)


# --- Secure aggregation (privacy/secagg.py; participant/secagg_tasks.py) ------------------------


@register("secagg_ins", version=1, arrays={"keys": INTEGER, "inner": INTEGER})
@dataclasses.dataclass(frozen=True, eq=False)
class SecAggIns(Message):
    """One stage of secure aggregation ``session`` of ``job_id``. ``stage`` is ``advertise``
    (``inner``: the encoded task whose result is aggregated, uint8), ``share`` (``names``: the
    roster, ``keys``: their public keys, uint8 (n, 32)), ``mask`` (``names``: who shared keys)
    or ``unmask`` (``names``: who sent masked inputs). ``config``: the ring encoder's settings."""

    job_id: str
    session: str
    stage: str
    threshold: int
    names: list[str] = dataclasses.field(default_factory=list)
    keys: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.uint8))
    inner: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.uint8))
    config: dict[str, Any] = dataclasses.field(default_factory=dict)


@register(
    "secagg_res",
    version=1,
    arrays={"public_key": INTEGER, "commitments": INTEGER, "masked": INTEGER, "reveals": INTEGER},
)
@dataclasses.dataclass(frozen=True, eq=False)
class SecAggRes(Message):
    """A participant's answer to one :class:`SecAggIns` stage: its ``public_key`` and the
    ``layout`` of its input (advertise), the dealer's ``commitments`` (share: uint8 (2, n, 32),
    self-mask seed then private key), its ``masked`` input (mask: uint32/uint64), or its
    ``reveals`` (unmask: uint8 (k, 82) share and salt, about ``owners`` of ``kinds`` at ``x``)."""

    session: str
    stage: str
    public_key: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.uint8))
    layout: list[str] = dataclasses.field(default_factory=list)
    commitments: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.uint8))
    masked: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.uint32))
    owners: list[str] = dataclasses.field(default_factory=list)
    kinds: list[str] = dataclasses.field(default_factory=list)
    x: list[int] = dataclasses.field(default_factory=list)
    reveals: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.uint8))


@register("secagg_share", version=1, arrays={"shares": INTEGER})
@dataclasses.dataclass(frozen=True, eq=False)
class SecAggShare(Message):
    """What ``owner`` deals ``holder`` in ``session``, sealed in a relay envelope: its Shamir
    shares at point ``x`` of its self-mask seed and of its private key (uint8 (2, 82): share
    then salt)."""

    session: str
    owner: str
    holder: str
    x: int
    shares: np.ndarray
