"""A naive, centralised histogram GBM written for the tests only: plain loops, no code shared
with ``cdp_federated.learning``. It bins rows with given edges, grows depth-wise trees with
XGBoost's gain, and records every split and leaf so tests can compare tree by tree."""

from __future__ import annotations

import math

import numpy as np


def codes_of(x, edges):
    """Bin of each value: the number of edges strictly below it."""
    out = np.zeros(x.shape, dtype=np.int64)
    for j, e in enumerate(edges):
        for i, v in enumerate(x[:, j]):
            out[i, j] = sum(1 for edge in e if edge < v)
    return out


def _sigmoid(m):
    return 1.0 / (1.0 + math.exp(-m)) if m >= 0 else math.exp(m) / (1.0 + math.exp(m))


def train(
    codes,
    y,
    n_edges,
    *,
    objective,
    n_trees,
    max_depth,
    learning_rate,
    reg_lambda,
    gamma,
    min_child_weight,
    base,
):
    """Returns (trees, margins): each tree is {"splits": {node: (feature, bin)}, "leaves":
    {node: value}} in heap numbering (root 0, children 2k+1, 2k+2)."""
    n, d = codes.shape
    margin = [base] * n
    trees = []
    for _ in range(n_trees):
        g, h = [], []
        for i in range(n):
            if objective == "regression":
                g.append(margin[i] - y[i])
                h.append(1.0)
            else:
                p = _sigmoid(margin[i])
                g.append(p - y[i])
                h.append(p * (1 - p))
        splits, leaves = {}, {}
        level = {0: list(range(n))}
        for depth in range(max_depth + 1):
            nxt = {}
            for node, rows in sorted(level.items()):
                G = sum(g[i] for i in rows)
                H = sum(h[i] for i in rows)
                best = None
                if depth < max_depth:
                    for f in range(d):
                        for b in range(n_edges[f]):
                            gl = sum(g[i] for i in rows if codes[i, f] <= b)
                            hl = sum(h[i] for i in rows if codes[i, f] <= b)
                            gr, hr = G - gl, H - hl
                            if hl < min_child_weight or hr < min_child_weight:
                                continue
                            gain = (
                                0.5
                                * (
                                    gl * gl / (hl + reg_lambda)
                                    + gr * gr / (hr + reg_lambda)
                                    - G * G / (H + reg_lambda)
                                )
                                - gamma
                            )
                            if gain > 0 and (best is None or gain > best[0]):
                                best = (gain, f, b)
                if best is None:
                    leaves[node] = -learning_rate * G / (H + reg_lambda)
                    for i in rows:
                        margin[i] += leaves[node]
                    continue
                _, f, b = best
                splits[node] = (f, b)
                nxt[2 * node + 1] = [i for i in rows if codes[i, f] <= b]
                nxt[2 * node + 2] = [i for i in rows if codes[i, f] > b]
            level = nxt
        trees.append({"splits": splits, "leaves": leaves})
    return trees, np.array(margin)
