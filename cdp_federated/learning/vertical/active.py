"""The active party of SecureBoost: holds the labels (and maybe features) and the secret key.

Per tree: compute g, h (logistic or squared loss), encode them as fixed-point integers with one
scale, encrypt the packed pair once and send it to every passive party; then level by level ask
each passive party for the cumulative histograms of the level's nodes (building the smaller
child, subtracting for the larger), decrypt and unpack the sums, compute every candidate's gain
(its own in plaintext), pick the best split per node, tell only the owner of a winning passive
split, and get back that node's left/right partition. Leaf weights stay with the active party.

Stages: ``new`` -> ``training`` -> ``trained`` (or ``failed``: no model is exposed after a
failure). Every reply is checked (type, sender, session, tree, level, nodes, sizes, value
ranges); a malformed or out-of-order one raises :class:`~cdp_federated.errors.ProtocolError`,
a missing one :class:`~cdp_federated.errors.TrainingError` naming the party.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

import numpy as np

from ...crypto.he import HEKeyPair, slot_capacity, unpack_slots
from ...crypto.he_workers import HEWorkers
from ...errors import ProtocolError, TrainingError
from .binning import bin_codes, quantile_edges
from .channel import PartyChannel, receive_reply
from .encoding import GHLayout, encode_fixed, pack_gh, unpack_gh
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
    rows_per_message,
)
from .model import ActiveModel, Split, Tree
from .params import SecureBoostParams
from .splits import gains, leaf_value, node_histograms

__all__ = ["ActiveParty"]


class ActiveParty:
    """``features`` may have zero columns (a label-only party); ``labels`` are 0/1 for ``binary``.
    ``workers > 1`` encrypts each tree's gradient chunks in that many spawned processes
    (:class:`~cdp_federated.crypto.he_workers.HEWorkers`, started on the first tree and ended when
    :meth:`fit` returns): sf-heu 0.5.2b0 encrypts OU on one thread (Paillier already uses every
    core), and the GIL is held during HEU calls, so threads would not help."""

    def __init__(
        self,
        name: str,
        features: np.ndarray,
        labels: np.ndarray,
        params: SecureBoostParams,
        keys: HEKeyPair,
        *,
        workers: int = 1,
    ) -> None:
        self.name = name
        self.params = params
        self.keys = keys
        self._workers, self._pool = max(1, int(workers)), None
        self._x = np.asarray(features, dtype=np.float64).reshape(len(labels), -1)
        self._y = np.asarray(labels, dtype=np.float64)
        if params.objective == "binary" and not np.isin(self._y, (0.0, 1.0)).all():
            raise TrainingError(
                "binary labels must be 0 or 1", field="label", fix="encode the label as 0/1"
            )
        self.stage = "new"
        self.session = ""
        self._model: ActiveModel | None = None

    @property
    def model_(self) -> ActiveModel:
        if self._model is None or self.stage != "trained":
            raise TrainingError(
                "no trained model",
                field="stage",
                value=self.stage,
                fix="call fit() and let it finish",
            )
        return self._model

    # --- protocol plumbing ------------------------------------------------------------------------

    def _receive(self, channel: PartyChannel, sender: str, kind: type) -> object:
        return receive_reply(channel, sender, kind, self.session)

    # --- training ---------------------------------------------------------------------------------

    def fit(self, channel: PartyChannel, passives: Sequence[str]) -> ActiveModel:
        if self.stage != "new":
            raise ProtocolError("fit() runs once per party object", field="stage", value=self.stage)
        self.stage = "training"
        try:
            model = self._fit(channel, list(passives))
        except BaseException:
            self.stage = "failed"
            raise
        finally:
            if self._pool is not None:
                self._pool.close()
                self._pool = None

        self._model, self.stage = model, "trained"
        return model

    def _fit(self, channel: PartyChannel, passives: list[str]) -> ActiveModel:
        p, n = self.params, self._y.size
        self.session = secrets.token_hex(8)
        pk = self.keys.public
        key = np.frombuffer(pk.to_bytes(), dtype=np.uint8)
        for name in passives:
            channel.send(
                name,
                SBSetup(
                    session=self.session,
                    scheme=pk.scheme,
                    backend=pk.backend,
                    public_key=key,
                    n_rows=n,
                    max_bins=p.max_bins,
                ),
            )
        for name in passives:
            ready = self._receive(channel, name, SBReady)
            if ready.n_features < 1:
                raise ProtocolError(
                    "passive party has no features", field="n_features", value=ready.n_features
                )
        self._edges = quantile_edges(self._x, p.max_bins)
        self._codes = bin_codes(self._x, self._edges)
        own_splits: list[tuple[int, float]] = []
        self._chunk = rows_per_message(pk, p.chunk_rows) if passives else p.chunk_rows
        margin = np.full(n, self._base_margin())
        base = float(margin[0]) if n else 0.0
        trees = []
        for t in range(p.n_trees):
            with_passives = passives if not (p.first_tree_active_only and t == 0) else []
            tree = self._grow(channel, with_passives, t, margin, own_splits)
            trees.append(tree)
            for name in with_passives:
                channel.send(name, SBTreeDone(session=self.session, tree=t))
        for name in passives:
            channel.send(name, SBFinish(session=self.session, n_trees=p.n_trees))
        return ActiveModel(
            owner=self.name,
            objective=p.objective,
            base_margin=base,
            own_splits=own_splits,
            trees=trees,
        )

    def _base_margin(self) -> float:
        mean = float(self._y.mean()) if self._y.size else 0.0
        if self.params.objective == "regression":
            return mean
        mean = min(max(mean, 1e-6), 1 - 1e-6)
        return math.log(mean / (1 - mean))

    def _gradients(self, margin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.params.objective == "binary":
            prob = 1.0 / (1.0 + np.exp(-margin))
            return prob - self._y, prob * (1.0 - prob)
        return margin - self._y, np.ones_like(margin)

    def _grow(
        self,
        channel: PartyChannel,
        passives: list[str],
        t: int,
        margin: np.ndarray,
        own_splits: list,
    ) -> Tree:
        p, n = self.params, self._y.size
        g_raw, h_raw = self._gradients(margin)
        g, h = encode_fixed(g_raw, p.frac_bits), encode_fixed(h_raw, p.frac_bits)
        layout = GHLayout.for_tree(g, h)
        if passives:
            self._send_gradients(channel, passives, t, g, h, layout)
        row_node = np.zeros(n, dtype=np.int64)
        tree = Tree()
        self._passive_sums: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
        frontier = [0]
        plan: dict[int, tuple[bool, int, int]] = {
            0: (True, -1, -1)
        }  # node -> (build, parent, sibling)
        for level in range(p.max_depth):
            if not frontier:
                break
            totals = {
                node: (int(g[row_node == node].sum()), int(h[row_node == node].sum()))
                for node in frontier
            }
            offers = self._own_offers(frontier, row_node, g, h)
            for name in passives:
                offers += self._passive_offers(
                    channel, name, t, level, frontier, row_node, plan, layout, totals
                )
            next_frontier, plan = [], {}
            for node in frontier:
                best = self._best(node, offers, totals[node])
                if best is None:
                    continue
                owner, cand = best
                rows = np.flatnonzero(row_node == node)
                if owner == self.name:
                    feature, b = divmod(cand, p.max_bins)
                    own_splits.append((feature, float(self._edges[feature][b])))
                    go_left, ref = self._codes[rows, feature] <= b, len(own_splits) - 1
                else:
                    channel.send(
                        owner, SBSplitDecision(session=self.session, tree=t, node=node, split=cand)
                    )
                    res = self._receive(channel, owner, SBSplitResult)
                    if res.tree != t or res.node != node or np.shape(res.go_left) != rows.shape:
                        raise ProtocolError(
                            "split result does not match the node",
                            field="go_left",
                            value=np.shape(res.go_left),
                        )
                    go_left, ref = np.asarray(res.go_left, dtype=bool), int(res.record)
                left, right = 2 * node + 1, 2 * node + 2
                row_node[rows[go_left]], row_node[rows[~go_left]] = left, right
                tree.splits[node] = Split(owner=owner, ref=ref, left=left, right=right)
                small_left = go_left.sum() <= (~go_left).sum()
                small, large = (left, right) if small_left else (right, left)
                plan[small], plan[large] = (True, node, -1), (False, node, small)
                next_frontier += [left, right]
            frontier = next_frontier
        for node in np.unique(row_node).tolist():
            gs, hs = int(g[row_node == node].sum()), int(h[row_node == node].sum())
            tree.leaves[node] = leaf_value(
                gs,
                hs,
                frac_bits=p.frac_bits,
                reg_lambda=p.reg_lambda,
                learning_rate=p.learning_rate,
            )
        margin += np.array([tree.leaves[i] for i in row_node.tolist()]) if n else 0.0
        return tree

    def _send_gradients(self, channel, passives, t, g, h, layout: GHLayout) -> None:
        pk, n = self.keys.public, g.size
        layout.check_fits(pk.plaintext_bits)
        slots = slot_capacity(pk.plaintext_bits, layout.slot_bits)
        packed, step = pack_gh(g, h, layout.shift), self._chunk
        # Encrypted once per tree, shared by all passives.
        if self._workers > 1 and n > step:
            if self._pool is None:
                self._pool = HEWorkers(pk, self._workers)
            blobs = self._pool.encrypt_chunks(packed, step)
        else:
            encrypted = pk.encrypt(packed)
            blobs = [
                pk.dumps(
                    encrypted if n <= step else pk.take(encrypted, np.arange(o, min(o + step, n)))
                )
                for o in range(0, n, step)
            ]
        for offset, raw in zip(range(0, n, step), blobs, strict=True):
            count = min(step, n - offset)
            blob = np.frombuffer(raw, dtype=np.uint8)
            for name in passives:
                channel.send(
                    name,
                    SBGradients(
                        session=self.session,
                        tree=t,
                        offset=offset,
                        count=count,
                        total=n,
                        slot_bits=layout.slot_bits,
                        slots=slots,
                        ciphertexts=blob,
                    ),
                )

    def _own_offers(
        self, frontier, row_node, g, h
    ) -> list[tuple[str, int, np.ndarray, np.ndarray, np.ndarray]]:
        """(owner, node, candidate ids, left g sums, left h sums) for the active party's features."""
        out = []
        if self._x.shape[1] == 0:
            return out
        b = self.params.max_bins
        for node in frontier:
            rows = np.flatnonzero(row_node == node)
            cg, ch = node_histograms(self._codes, rows, g, h, b)
            ids = np.arange(cg.size).reshape(cg.shape)[:, : b - 1].reshape(-1)
            out.append(
                (self.name, node, ids, cg[:, : b - 1].reshape(-1), ch[:, : b - 1].reshape(-1))
            )
        return out

    def _passive_offers(
        self, channel, name, t, level, frontier, row_node, plan, layout: GHLayout, totals
    ):
        nodes = np.array(frontier, dtype=np.int64)
        build = np.array([plan[v][0] for v in frontier], dtype=bool)
        parents = np.array([plan[v][1] for v in frontier], dtype=np.int64)
        siblings = np.array([plan[v][2] for v in frontier], dtype=np.int64)
        channel.send(
            name,
            SBHistogramRequest(
                session=self.session,
                tree=t,
                level=level,
                nodes=nodes,
                row_node=row_node,
                build=build,
                parents=parents,
                siblings=siblings,
            ),
        )
        res = self._receive(channel, name, SBHistogramResponse)
        if res.tree != t or res.level != level or not np.array_equal(res.nodes, nodes):
            raise ProtocolError(
                "histogram response for other nodes", field="nodes", value=res.nodes.tolist()[:8]
            )
        blob = bytes(res.ciphertexts)
        if int(np.sum(res.sizes)) != len(blob) or (res.sizes < 0).any():
            raise ProtocolError(
                "histogram response sizes do not add up", field="sizes", value=len(blob)
            )
        starts = np.concatenate([[0], np.cumsum(res.sizes)]).astype(np.int64)
        previous, current = self._passive_sums.get(name, {}), {}
        # Built nodes first: a derived (larger) child is its parent's sums minus its sibling's.
        order = sorted(range(len(frontier)), key=lambda j: not build[j])
        for j in order:
            node, count, packed = frontier[j], int(res.candidates[j]), int(res.packed[j])
            if build[j]:
                part = blob[starts[j] : starts[j + 1]]
                current[node] = self._decrypt_sums(part, count, packed, layout)
            else:
                parent, sibling = previous.get(int(parents[j])), current.get(int(siblings[j]))
                sizes = {count, -1 if parent is None else parent[0].size}
                sizes.add(-1 if sibling is None else sibling[0].size)
                if packed or res.sizes[j] or len(sizes) != 1:
                    raise ProtocolError(
                        "a derived node must come without ciphertexts, with its family's candidates",
                        field="packed",
                        value=packed,
                    )
                current[node] = (parent[0] - sibling[0], parent[1] - sibling[1])
            left_g, left_h = current[node]
            total_g, total_h = totals[node]
            rows_in = int((row_node == node).sum())
            # Every left sum is a subset sum: anything else is a faulty or malicious party (and
            # refusing it blocks OU's chosen-ciphertext key recovery).
            if (
                (left_h < 0).any()
                or (left_h > total_h).any()
                or (np.abs(left_g) > rows_in * layout.g_bound).any()
            ):
                raise ProtocolError(
                    "histogram sums out of range",
                    field="ciphertexts",
                    value=name,
                    fix="the passive party must send sums of the gradients it was given",
                )
        self._passive_sums[name] = current
        return [
            (name, node, np.arange(current[node][0].size), *current[node])
            for node in frontier
            if current[node][0].size
        ]

    def _decrypt_sums(
        self, part: bytes, count: int, packed: int, layout: GHLayout
    ) -> tuple[np.ndarray, np.ndarray]:
        """A built node's (left G, left H) per candidate, from its packed ciphertexts."""
        if count == 0:
            if packed or part:
                raise ProtocolError("ciphertexts for no candidates", field="packed", value=packed)
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        pk = self.keys.public
        slots = slot_capacity(pk.plaintext_bits, layout.slot_bits)
        if packed != -(-count // slots):
            raise ProtocolError(
                "packed ciphertext count does not match the candidates",
                field="packed",
                value=packed,
            )
        values = unpack_slots(
            self.keys.decrypt(pk.loads(part, packed)), layout.slot_bits, slots, count
        )
        return unpack_gh(values, layout.shift)

    def _best(self, node: int, offers, total: tuple[int, int]) -> tuple[str, int] | None:
        p = self.params
        best_gain, best = 0.0, None
        for owner, onode, ids, left_g, left_h in offers:  # active first, then passives in order
            if onode != node or ids.size == 0:
                continue
            gain = gains(
                left_g,
                left_h,
                total[0],
                total[1],
                frac_bits=p.frac_bits,
                reg_lambda=p.reg_lambda,
                gamma=p.gamma,
                min_child_weight=p.min_child_weight,
            )
            k = int(np.argmax(gain))
            if gain[k] > best_gain:
                best_gain, best = float(gain[k]), (owner, int(ids[k]))
        return best

    # --- scoring ----------------------------------------------------------------------------------

    def decision_function(
        self, features: np.ndarray, channel: PartyChannel, passives: Sequence[str]
    ) -> np.ndarray:
        """Cooperative scoring of aligned rows: each passive party sends its split decisions."""
        model = self.model_
        x = np.asarray(features, dtype=np.float64).reshape(-1, self._x.shape[1])
        decisions = {}
        for name in passives:
            channel.send(name, SBPredictRequest(session=self.session, n_rows=x.shape[0]))
            res = self._receive(channel, name, SBPredictResponse)
            if np.shape(res.decisions) != (res.records.size, x.shape[0]):
                raise ProtocolError(
                    "decisions have the wrong shape",
                    field="decisions",
                    value=np.shape(res.decisions),
                )
            decisions[name] = {int(r): res.decisions[i] for i, r in enumerate(res.records.tolist())}
        return model.decision_function(x, decisions)

    def predict_proba(
        self, features: np.ndarray, channel: PartyChannel, passives: Sequence[str]
    ) -> np.ndarray:
        if self.params.objective != "binary":
            raise TrainingError(
                "predict_proba needs the binary objective",
                field="objective",
                value=self.params.objective,
            )
        return self.model_.predict_proba_from_margin(
            self.decision_function(features, channel, passives)
        )
