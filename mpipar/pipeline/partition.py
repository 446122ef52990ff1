"""Split a list of layers into contiguous pipeline stages.

`partition(layers, num_stages, boundaries=None, by="params")` returns one
`nn.Sequential` per stage holding the original layer objects (no copies), in
order; every layer lands in exactly one stage and no stage is empty. Stages
are balanced by parameter count (default), by layer count, or by given
per-layer costs; or cut at explicit `boundaries`. For an interleaved schedule
ask for p * v stages and give stage s the chunks [parts[c*p + s] for c in range(v)].
"""
from __future__ import annotations

from ..errors import MpiparError


def partition(layers, num_stages: int, boundaries=None, by="params"):
    """Contiguous split of `layers` into `num_stages` nn.Sequential stages.

    boundaries: the index of the first layer of each stage after the first
    (num_stages - 1 increasing cut points), or all num_stages + 1 edges
    starting at 0 and ending at len(layers).
    by: "params" (balance parameter counts), "layers" (balance layer counts) or
    a sequence of one non-negative cost per layer; ignored when boundaries are given.
    """
    from torch import nn

    layers = list(layers)
    n = len(layers)
    if not isinstance(num_stages, int) or num_stages < 1:
        raise MpiparError(f"partition: num_stages must be a positive int, got {num_stages!r}")
    if n < num_stages:
        raise MpiparError(f"partition: {n} layers cannot fill {num_stages} non-empty stages")
    if boundaries is not None:
        edges = _edges_from_boundaries(list(boundaries), n, num_stages)
    else:
        edges = balanced_edges(_costs(layers, by), num_stages)
    return [nn.Sequential(*layers[edges[i]:edges[i + 1]]) for i in range(num_stages)]


def _costs(layers, by) -> list[float]:
    if by == "params":
        return [float(sum(p.numel() for p in layer.parameters())) for layer in layers]
    if by == "layers":
        return [1.0] * len(layers)
    if isinstance(by, str):
        raise MpiparError(f"partition: by must be 'params', 'layers' or a list of costs, got {by!r}")
    costs = [float(c) for c in by]
    if len(costs) != len(layers) or any(c < 0 for c in costs):
        raise MpiparError(f"partition: need {len(layers)} non-negative costs, got {list(by)!r}")
    return costs


def _edges_from_boundaries(bounds: list[int], n: int, k: int) -> list[int]:
    if len(bounds) == k - 1:
        edges = [0, *bounds, n]
    elif len(bounds) == k + 1:
        edges = bounds
    else:
        raise MpiparError(f"partition: boundaries for {k} stages need {k - 1} cut points "
                          f"(or {k + 1} edges), got {bounds!r}")
    if edges[0] != 0 or edges[-1] != n or any(b >= a for a, b in zip(edges[1:], edges)):
        raise MpiparError(f"partition: boundaries {bounds!r} must increase strictly from 0 to {n} "
                          f"with no empty stage")
    return edges


def balanced_edges(costs: list[float], k: int) -> list[int]:
    """Edges [0, ..., n] of k non-empty contiguous parts minimising the largest part's cost.

    Ties go to the split with the smaller sum of squared part costs, then to
    later cuts (so a parameter-free layer stays with the layer before it).
    """
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = (float("inf"), float("inf"))
    # best[j][i]: (max, sumsq) for the first i layers in j parts; cut[j][i]: start of part j
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = (0.0, 0.0)
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            for start in range(j - 1, i):
                prev = best[j - 1][start]
                if prev == inf:
                    continue
                part = prefix[i] - prefix[start]
                cand = (max(prev[0], part), prev[1] + part * part)
                if cand <= best[j][i]:
                    best[j][i], cut[j][i] = cand, start
    edges = [n]
    for j in range(k, 0, -1):
        edges.append(cut[j][edges[-1]])
    return edges[::-1]
