"""SecureBoost wire messages, registered in their own registry (decode them with :data:`VERTICAL_CODEC`).

What travels, by direction (``docs/vertical.md`` says what each party learns from it):

* active -> passive: the public key, encrypted packed (g, h) chunks, each level's node of every
  row (``row_node``) with the build/subtract plan, the id of a passive's winning split (to that
  owner only), tree and training ends, scoring requests;
* passive -> active: its feature count, packed encrypted cumulative histograms of the nodes it
  builds (the root and each smaller child; the active party derives the larger child as parent
  minus sibling in plaintext) with candidate counts (split ids are positions, never thresholds),
  the left/right partition of a won split, and, when scoring, the boolean decisions of its split
  records.

Ciphertexts travel as ``uint8`` arrays holding the HE backend's own serialisation.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ...crypto.he import HEPublicKey
from ...federation.codec import Codec
from ...federation.messages import BOOLEAN, INTEGER, Failure, Message, register

__all__ = [
    "VERTICAL_MESSAGE_TYPES",
    "VERTICAL_CODEC",
    "SBSetup",
    "SBReady",
    "SBGradients",
    "SBHistogramRequest",
    "SBHistogramResponse",
    "SBSplitDecision",
    "SBSplitResult",
    "SBTreeDone",
    "SBFinish",
    "SBPredictRequest",
    "SBPredictResponse",
    "Failure",
    "rows_per_message",
]

VERTICAL_MESSAGE_TYPES: dict[str, type[Message]] = {"failure": Failure}
_BYTES = "u"


def _reg(name: str, arrays: dict[str, str] | None = None):
    return register(name, version=1, arrays=arrays, registry=VERTICAL_MESSAGE_TYPES)


@_reg("sb_setup", {"public_key": _BYTES})
@dataclasses.dataclass(frozen=True, eq=False)
class SBSetup(Message):
    """Start a SecureBoost session: HE scheme/backend, the active party's public key, the aligned
    row count and the bin budget."""

    session: str
    scheme: str
    backend: str
    public_key: np.ndarray
    n_rows: int
    max_bins: int


@_reg("sb_ready")
@dataclasses.dataclass(frozen=True, eq=False)
class SBReady(Message):
    session: str
    n_features: int


@_reg("sb_gradients", {"ciphertexts": _BYTES})
@dataclasses.dataclass(frozen=True, eq=False)
class SBGradients(Message):
    """Rows ``offset .. offset+count`` of tree ``tree``'s encrypted packed (g, h); ``slot_bits`` and
    ``slots`` say how to pack histogram sums before returning them."""

    session: str
    tree: int
    offset: int
    count: int
    total: int
    slot_bits: int
    slots: int
    ciphertexts: np.ndarray


@_reg(
    "sb_histogram_request",
    {
        "nodes": INTEGER,
        "row_node": INTEGER,
        "build": BOOLEAN,
        "parents": INTEGER,
        "siblings": INTEGER,
    },
)
@dataclasses.dataclass(frozen=True, eq=False)
class SBHistogramRequest(Message):
    """Histograms for ``nodes`` at ``level``; ``row_node[i]`` is row ``i``'s node (-1: in a leaf).
    ``build[j]`` builds node ``j`` from its rows; otherwise it is ``parents[j] - siblings[j]``,
    which the active party computes itself from sums it already decrypted."""

    session: str
    tree: int
    level: int
    nodes: np.ndarray
    row_node: np.ndarray
    build: np.ndarray
    parents: np.ndarray
    siblings: np.ndarray


@_reg(
    "sb_histogram_response",
    {
        "nodes": INTEGER,
        "candidates": INTEGER,
        "packed": INTEGER,
        "sizes": INTEGER,
        "ciphertexts": _BYTES,
    },
)
@dataclasses.dataclass(frozen=True, eq=False)
class SBHistogramResponse(Message):
    """Per node: ``candidates[j]`` split ids (0..c-1), their packed ciphertext count and byte size
    within the concatenated ``ciphertexts`` (both 0 for a node that is not built: the active
    party refuses ciphertexts for it)."""

    session: str
    tree: int
    level: int
    nodes: np.ndarray
    candidates: np.ndarray
    packed: np.ndarray
    sizes: np.ndarray
    ciphertexts: np.ndarray


@_reg("sb_split_decision")
@dataclasses.dataclass(frozen=True, eq=False)
class SBSplitDecision(Message):
    """To the owner only: its candidate ``split`` won at ``node``."""

    session: str
    tree: int
    node: int
    split: int


@_reg("sb_split_result", {"go_left": BOOLEAN})
@dataclasses.dataclass(frozen=True, eq=False)
class SBSplitResult(Message):
    """The owner's lookup-table ``record`` for that split and, for the node's rows in row order,
    whether each goes left."""

    session: str
    tree: int
    node: int
    record: int
    go_left: np.ndarray


@_reg("sb_tree_done")
@dataclasses.dataclass(frozen=True, eq=False)
class SBTreeDone(Message):
    session: str
    tree: int


@_reg("sb_finish")
@dataclasses.dataclass(frozen=True, eq=False)
class SBFinish(Message):
    session: str
    n_trees: int


@_reg("sb_predict_request")
@dataclasses.dataclass(frozen=True, eq=False)
class SBPredictRequest(Message):
    """Score ``n_rows`` aligned rows (the passive party's scoring data, in the agreed order)."""

    session: str
    n_rows: int


@_reg("sb_predict_response", {"records": INTEGER, "decisions": BOOLEAN})
@dataclasses.dataclass(frozen=True, eq=False)
class SBPredictResponse(Message):
    """``decisions[r, i]``: row ``i`` goes left at split record ``records[r]``."""

    session: str
    records: np.ndarray
    decisions: np.ndarray


VERTICAL_CODEC = Codec(types=VERTICAL_MESSAGE_TYPES)


def rows_per_message(public_key: HEPublicKey, chunk_rows: int) -> int:
    """``chunk_rows``, or fewer so that one message's ciphertexts stay within half the codec's
    array limit (100k rows of 2048-bit Paillier ciphertexts are about 53 MB, over the frame and
    element limits): the other half is headroom for serialisation overhead."""
    sample = 8
    per_row = len(public_key.dumps(public_key.encrypt([0] * sample))) / sample + 16
    budget = min(VERTICAL_CODEC.max_elements, VERTICAL_CODEC.max_bytes) // 2
    return max(1, min(int(chunk_rows), int(budget // per_row)))
