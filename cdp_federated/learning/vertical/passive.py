"""The passive party of SecureBoost: features only, no labels; an explicit stage machine.

Stages: ``setup`` -> ``idle`` (between trees) -> ``gradients`` (collecting encrypted chunks) ->
``growing`` (answering one level at a time) -> back to ``idle`` on ``sb_tree_done`` ->
``trained`` on ``sb_finish``. Every message is checked against the stage, the session, the tree
and the level; anything else raises :class:`~cdp_federated.errors.ProtocolError` and leaves the
state untouched.

What it keeps to itself: its feature values, bin edges, and the lookup table ``record -> (feature,
threshold)`` of the splits it won. What it learns: the row partition of every node (from
``row_node``), which of its own candidates won, and (scoring) which rows are scored.
"""

from __future__ import annotations

import numpy as np

from ...crypto.he import CipherVector, HEPublicKey, load_public_key
from ...crypto.he_workers import HEWorkers
from ...errors import ProtocolError, TrainingError
from .binning import bin_codes, quantile_edges
from .channel import dispatch, scoring_rows
from .messages import (
    SBFinish,
    SBGradients,
    SBHistogramRequest,
    SBHistogramResponse,
    SBPredictRequest,
    SBPredictResponse,
    SBReady,
    SBSetup,
    SBSplitDecision,
    SBSplitResult,
    SBTreeDone,
)
from .splits import valid_candidates

__all__ = ["PassiveParty"]


def _refuse(message: str, field: str, value: object = None) -> ProtocolError:
    return ProtocolError(message, field=field, value=value, fix="restart the session from sb_setup")


class PassiveParty:
    """``features``: this party's aligned training rows (rows x features, finite).
    ``allow_insecure_keys`` accepts keys under 2048 bits (tests only). ``workers > 1`` bucket-sums
    the gradient chunks in that many spawned processes (:class:`~cdp_federated.crypto.he_workers.HEWorkers`);
    call :meth:`close` (or let ``sb_finish`` do it) to end them. One HEU bucket-sum call already
    uses every core, so workers rarely pay off (``docs/vertical.md``, Speed)."""

    def __init__(
        self,
        name: str,
        features: np.ndarray,
        *,
        allow_insecure_keys: bool = False,
        workers: int = 1,
    ) -> None:
        self.name = name
        self._x = np.asarray(features, dtype=np.float64)
        if self._x.ndim != 2 or self._x.shape[1] == 0:
            raise TrainingError(
                "a passive party needs a 2-D feature array", field="features", value=self._x.shape
            )
        self._insecure = allow_insecure_keys
        self.stage = "setup"
        self.session = ""
        self.records: list[tuple[int, float]] = []  # record id -> (feature, threshold): never sent
        self._scoring: np.ndarray | None = None
        self._workers, self._pool = max(1, int(workers)), None

    def close(self) -> None:
        """End the worker processes, if any."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    # --- dispatch ---------------------------------------------------------------------------------

    def handle(self, message: object) -> list[object]:
        """Process one message from the active party; returns the replies to send back."""
        handlers = {
            SBSetup: ("setup", self._on_setup),
            SBGradients: ("idle|gradients", self._on_gradients),
            SBHistogramRequest: ("growing", self._on_histograms),
            SBSplitDecision: ("growing", self._on_decision),
            SBTreeDone: ("growing", self._on_tree_done),
            SBFinish: ("idle|growing", self._on_finish),
            SBPredictRequest: ("trained", self._on_predict),
        }
        return dispatch(self, message, handlers, SBSetup, _refuse)

    def set_scoring_features(self, features: np.ndarray) -> None:
        """Rows to score next, aligned with the active party's (same order)."""
        self._scoring = scoring_rows(features, self._x.shape[1])

    # --- training ---------------------------------------------------------------------------------

    def _on_setup(self, m: SBSetup) -> list[object]:
        if m.n_rows != self._x.shape[0]:
            raise _refuse("row count differs from this party's aligned rows", "n_rows", m.n_rows)
        if not 2 <= m.max_bins <= 127:
            raise _refuse("max_bins out of range", "max_bins", m.max_bins)
        self._key: HEPublicKey = load_public_key(
            bytes(m.public_key), scheme=m.scheme, backend=m.backend, insecure=self._insecure
        )
        self._n_bins = m.max_bins
        self._edges = quantile_edges(self._x, m.max_bins)
        self._codes = bin_codes(self._x, self._edges)
        self.session = m.session
        self.stage = "idle"
        self._tree = -1
        return [SBReady(session=self.session, n_features=self._x.shape[1])]

    def _on_gradients(self, m: SBGradients) -> list[object]:
        # Validate everything (including parsing the ciphertexts) before touching the state.
        n = self._x.shape[0]
        starting = self.stage == "idle"
        if starting and (m.tree <= self._tree or m.offset != 0):
            raise _refuse("gradients must start a new tree at row 0", "tree", m.tree)
        tree = m.tree if starting else self._tree
        received = 0 if starting else self._received
        packing = (m.slot_bits, m.slots) if starting else (self._slot_bits, self._slots)
        if m.tree != tree or m.offset != received or m.total != n or m.count < 1:
            raise _refuse("gradient chunk out of order", "offset", m.offset)
        if m.offset + m.count > n or (m.slot_bits, m.slots) != packing:
            raise _refuse("gradient chunk inconsistent with the tree", "count", m.count)
        if m.slots < 1 or m.slot_bits < 2 or m.slots * m.slot_bits > self._key.plaintext_bits:
            raise _refuse("packing does not fit the plaintext space", "slots", m.slots)
        part = self._key.loads(bytes(m.ciphertexts), m.count)
        if starting:
            self._tree, self._chunks, self._received = m.tree, [], 0
            self._slot_bits, self._slots = m.slot_bits, m.slots
            self.stage = "gradients"
        if self._workers > 1:
            if self._pool is None:
                self._pool = HEWorkers(self._key, self._workers)
            rows = slice(m.offset, m.offset + m.count)
            self._pool.store(m.offset, bytes(m.ciphertexts), m.count, self._codes[rows])
        self._chunks.append((m.offset, part))
        self._received += m.count
        if self._received == n:
            self._level, self._previous, self._node_rows = 0, set(), {}
            self.stage = "growing"
        return []

    def _bucket_sums(self, masks: list[np.ndarray]) -> list[CipherVector]:
        # Histograms are linear: sum each chunk's bucket sums instead of joining the chunks.
        if self._pool is not None:
            return self._pool.bucket_sums(masks, self._n_bins, self._codes.shape[1] * self._n_bins)
        total: list[CipherVector] = []
        for offset, part in self._chunks:
            rows = slice(offset, offset + part.length)
            sums = self._key.bucket_sums(
                part,
                [mask[rows] for mask in masks],
                self._codes[rows],
                self._n_bins,
                cumulative=True,
            )
            total = (
                sums
                if not total
                else [self._key.add(a, b) for a, b in zip(total, sums, strict=True)]
            )
        return total

    def _on_histograms(self, m: SBHistogramRequest) -> list[object]:
        n = self._x.shape[0]
        nodes, build = np.asarray(m.nodes, dtype=np.int64), np.asarray(m.build, dtype=bool)
        row_node = np.asarray(m.row_node, dtype=np.int64)
        if m.tree != self._tree or m.level != self._level:
            raise _refuse("histogram request for another tree or level", "level", m.level)
        if row_node.shape != (n,) or not (
            nodes.shape == build.shape == m.parents.shape == m.siblings.shape
        ):
            raise _refuse(
                "histogram request arrays have inconsistent shapes", "row_node", row_node.shape
            )
        if len(set(nodes.tolist())) != nodes.size or nodes.size == 0:
            raise _refuse("histogram request lists no or duplicate nodes", "nodes", nodes.size)
        if m.level == 0:
            if nodes.tolist() != [0] or not build.all() or (row_node != 0).any():
                raise _refuse("level 0 is the root with every row", "nodes", nodes.tolist())
            # One candidate list per tree, fixed at the root: a child's own candidates are a subset
            # (its bins are a subset of its parent's), and the extra ones repeat a lower
            # candidate's sums or empty a child, so the first best split is unchanged. A fixed
            # list lets the active party get the larger child's sums as the parent's minus the
            # smaller child's, in plaintext: no pass over its rows and no ciphertexts for it.
            self._candidates = valid_candidates(self._codes, np.arange(n), self._n_bins)
        for parent, sibling in zip(m.parents[~build], m.siblings[~build], strict=True):
            if int(parent) not in self._previous or int(sibling) not in nodes[build]:
                raise _refuse(
                    "cannot derive a node: unknown parent or sibling", "parents", int(parent)
                )
        offered = self._candidates
        level: dict[int, CipherVector] = {}
        masks = [row_node == node for node in nodes[build]]
        if masks and offered.size:
            for node, sums in zip(nodes[build].tolist(), self._bucket_sums(masks), strict=True):
                level[node] = self._key.pack(
                    self._key.take(sums, offered), self._slot_bits, self._slots
                )
        counts, packed, sizes, blobs = [], [], [], []
        self._node_rows = {}
        for node in nodes.tolist():
            self._node_rows[node] = np.flatnonzero(row_node == node)
            vec = level.get(node)  # None for a derived node (and when nothing is offered)
            blob = b"" if vec is None else self._key.dumps(vec)
            counts.append(offered.size)
            packed.append(0 if vec is None else len(vec))
            sizes.append(len(blob))
            blobs.append(blob)
        self._previous = set(nodes.tolist())
        self._level += 1
        return [
            SBHistogramResponse(
                session=self.session,
                tree=self._tree,
                level=m.level,
                nodes=nodes.astype(np.int32),
                candidates=np.array(counts, dtype=np.int64),
                packed=np.array(packed, dtype=np.int64),
                sizes=np.array(sizes, dtype=np.int64),
                ciphertexts=np.frombuffer(b"".join(blobs), dtype=np.uint8),
            )
        ]

    def _on_decision(self, m: SBSplitDecision) -> list[object]:
        rows = self._node_rows.get(m.node) if m.tree == self._tree else None
        if rows is None or not 0 <= m.split < self._candidates.size:
            raise _refuse("split decision for an unknown node or candidate", "split", m.split)
        feature, b = divmod(int(self._candidates[m.split]), self._n_bins)
        threshold = float(self._edges[feature][b])
        self.records.append((feature, threshold))
        go_left = self._codes[rows, feature] <= b
        return [
            SBSplitResult(
                session=self.session,
                tree=self._tree,
                node=m.node,
                record=len(self.records) - 1,
                go_left=go_left,
            )
        ]

    def _on_tree_done(self, m: SBTreeDone) -> list[object]:
        if m.tree != self._tree:
            raise _refuse("tree end for another tree", "tree", m.tree)
        self._chunks, self._previous, self._node_rows = [], set(), {}
        self.stage = "idle"
        return []

    def _on_finish(self, m: SBFinish) -> list[object]:
        self.close()
        self._chunks, self._previous, self._node_rows = [], set(), {}
        self.stage = "trained"
        return []

    # --- scoring ----------------------------------------------------------------------------------

    def _on_predict(self, m: SBPredictRequest) -> list[object]:
        if self._scoring is None or self._scoring.shape[0] != m.n_rows:
            raise _refuse("no scoring rows of that count were set", "n_rows", m.n_rows)
        decisions = np.zeros((len(self.records), m.n_rows), dtype=bool)
        for r, (feature, threshold) in enumerate(self.records):
            decisions[r] = self._scoring[:, feature] <= threshold
        return [
            SBPredictResponse(
                session=self.session,
                records=np.arange(len(self.records), dtype=np.int64),
                decisions=decisions,
            )
        ]
