"""A naive centralized GBM on the joined data, sharing no code with cdp_federated.learning.

Same specification as docs/vertical.md: per-column quantile bins (numpy's quantile at k/max_bins,
distinct values, bin = number of edges strictly below x), gradients and hessians rounded to
integers at scale 2**frac_bits, XGBoost gain on those integer sums, first maximum over
(feature, bin) in column order, depthwise growth.
"""

from __future__ import annotations

import math

import numpy as np


def fit_reference(
    x,
    y,
    *,
    objective,
    n_trees,
    max_depth,
    learning_rate,
    max_bins,
    reg_lambda,
    gamma,
    min_child_weight,
    frac_bits,
):
    n, d = x.shape
    q = np.arange(1, max_bins) / max_bins
    edges = [np.unique(np.quantile(x[:, j], q)) for j in range(d)]
    codes = np.stack([np.searchsorted(edges[j], x[:, j], side="left") for j in range(d)], axis=1)
    if objective == "binary":
        p = min(max(float(y.mean()), 1e-6), 1 - 1e-6)
        base = math.log(p / (1 - p))
    else:
        base = float(y.mean())
    margin = np.full(n, base)
    scale = 2.0**-frac_bits
    trees = []
    for _ in range(n_trees):
        if objective == "binary":
            prob = 1.0 / (1.0 + np.exp(-margin))
            g_f, h_f = prob - y, prob * (1.0 - prob)
        else:
            g_f, h_f = margin - y, np.ones(n)
        g = [int(v) for v in np.rint(g_f * float(1 << frac_bits))]
        h = [int(v) for v in np.rint(h_f * float(1 << frac_bits))]
        node_of = [0] * n
        splits, leaves = {}, {}
        frontier = [0]
        for _level in range(max_depth):
            nxt = []
            for node in frontier:
                rows = [i for i in range(n) if node_of[i] == node]
                G, H = sum(g[i] for i in rows), sum(h[i] for i in rows)
                best, best_gain = None, 0.0
                for f in range(d):
                    for b in range(max_bins - 1):
                        GL = sum(g[i] for i in rows if codes[i, f] <= b)
                        HL = sum(h[i] for i in rows if codes[i, f] <= b)
                        gl, hl = GL * scale, HL * scale
                        gr, hr = (G - GL) * scale, (H - HL) * scale
                        gg, hh = G * scale, H * scale
                        if hl < min_child_weight or hr < min_child_weight:
                            continue
                        gain = (
                            0.5
                            * (
                                gl * gl / (hl + reg_lambda)
                                + gr * gr / (hr + reg_lambda)
                                - gg * gg / (hh + reg_lambda)
                            )
                            - gamma
                        )
                        if gain > best_gain:
                            best, best_gain = (f, b), gain
                if best is None:
                    continue
                f, b = best
                splits[node] = (f, float(edges[f][b]))
                for i in rows:
                    node_of[i] = 2 * node + 1 if codes[i, f] <= b else 2 * node + 2
                nxt += [2 * node + 1, 2 * node + 2]
            frontier = nxt
        for node in set(node_of):
            rows = [i for i in range(n) if node_of[i] == node]
            G, H = sum(g[i] for i in rows), sum(h[i] for i in rows)
            leaves[node] = -learning_rate * (G * scale) / (H * scale + reg_lambda)
        margin = margin + np.array([leaves[v] for v in node_of])
        trees.append((splits, leaves))
    return base, trees, margin
