"""Derived metrics of scaling studies, on the DataFrames of `analysis.load`.

- `scaling`: strong-scaling speedup T(n0)/T(n) and efficiency speedup*n0/n, or
  weak-scaling efficiency T(n0)/T(n) (and scaled speedup efficiency*n/n0),
  relative to the smallest `n` of each group of points.
- `vs_limit`: a bandwidth as a fraction of a physical limit (busbw / memcpy).
- `bubble_error`: measured minus simulated pipeline bubble fraction.
- `fit_alpha_beta`: latency alpha and inverse bandwidth beta of collective
  points, fitted per (op, algorithm, group size) with mpipar.comm.fit_alpha_beta.
Every function returns a new DataFrame and leaves its input alone.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..plan.alpha_beta import cost as _model_cost
from ..plan.alpha_beta import fit_alpha_beta as _fit
from ..errors import MpiparError


def _need(df: pd.DataFrame, *cols: str) -> None:
    missing = [c for c in cols if c and c not in df.columns]
    if missing:
        raise MpiparError(f"analysis: missing columns {missing}; have {sorted(df.columns)}")


def _groups(df: pd.DataFrame, by):
    by = [b for b in (by or ()) if b in df.columns]
    if not by:
        yield (), df
        return
    yield from df.groupby(by, dropna=False, sort=True)


def scaling(df: pd.DataFrame, n: str, time: str, by=(), kind: str = "strong") -> pd.DataFrame:
    """Speedup and efficiency of `time` (lower is better) over the ranks column `n`.

    Points are grouped by the columns `by` (those present); within a group the
    point with the smallest `n` is the baseline (several equal-n points: the
    fastest). strong: speedup = T0/T, efficiency = speedup * n0/n.
    weak (work per rank fixed): efficiency = T0/T, speedup = efficiency * n/n0.
    """
    if kind not in ("strong", "weak"):
        raise MpiparError(f"scaling: kind must be 'strong' or 'weak', got {kind!r}")
    _need(df, n, time)
    out = []
    for _, g in _groups(df, by):
        g = g.copy()
        n0 = g[n].min()
        t0 = g.loc[g[n] == n0, time].min()
        ratio = t0 / g[time]
        if kind == "strong":
            g["speedup"], g["efficiency"] = ratio, ratio * n0 / g[n]
        else:
            g["efficiency"], g["speedup"] = ratio, ratio * g[n] / n0
        g["baseline_n"] = n0
        out.append(g)
    return pd.concat(out, ignore_index=True) if out else df.assign(speedup=[], efficiency=[])


def vs_limit(df: pd.DataFrame, value: str, limit: str, name: str | None = None) -> pd.DataFrame:
    """Add `name` (default `<value>_frac_of_<limit>`) = value / limit, e.g. busbw / memcpy bandwidth."""
    _need(df, value, limit)
    out = df.copy()
    out[name or f"{value}_frac_of_{limit}"] = out[value] / out[limit].replace(0, np.nan)
    return out


def bubble_error(df: pd.DataFrame, measured: str = "bubble_measured",
                 simulated: str = "bubble_simulated") -> pd.DataFrame:
    """Add `bubble_error` = measured - simulated bubble fraction."""
    _need(df, measured, simulated)
    out = df.copy()
    out["bubble_error"] = out[measured] - out[simulated]
    return out


def fit_alpha_beta(df: pd.DataFrame, op: str = "op", nbytes: str = "nbytes", time: str = "time_s",
                   group_size: str = "world_size", by=("algorithm",)) -> pd.DataFrame:
    """Alpha-beta fit of collective points: one row per (op, *by, group size).

    Only ops with a model (all_reduce, all_gather, reduce_scatter), group
    sizes >= 2 and at least two distinct sizes are fitted. Columns: the keys,
    `alpha_s`, `beta_s_per_byte`, `bandwidth_GBps` (1/beta), `points`, and
    `rel_rms` (RMS of (model - measured) / measured over the points).
    """
    _need(df, op, nbytes, time, group_size)
    keys = [op, *[b for b in by if b in df.columns], group_size]
    rows = []
    for key, g in df.groupby(keys, dropna=False, sort=True):
        key = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        name, size = key[op], int(key[group_size])
        g = g.dropna(subset=[nbytes, time])
        if name not in ("all_reduce", "all_gather", "reduce_scatter") or size < 2 or g[nbytes].nunique() < 2:
            continue
        alpha, beta = _fit(name, g[nbytes].to_numpy(float), size, g[time].to_numpy(float))
        model = np.array([_model_cost(name, b, size, alpha, beta) for b in g[nbytes]])
        rel = (model - g[time].to_numpy(float)) / g[time].to_numpy(float)
        rows.append({**key, "alpha_s": alpha, "beta_s_per_byte": beta,
                     "bandwidth_GBps": (1e-9 / beta) if beta > 0 else np.nan,
                     "points": len(g), "rel_rms": float(np.sqrt(np.mean(rel ** 2)))})
    return pd.DataFrame(rows)


def ratio_to(df: pd.DataFrame, value: str, baseline_mask, by=(), name: str | None = None) -> pd.DataFrame:
    """Add `name` (default `<value>_vs_baseline`) = value / value of the baseline row of its group.

    `baseline_mask`: boolean Series selecting the baseline rows (e.g. the
    serial implementation); groups are formed by the columns `by` present.
    """
    _need(df, value)
    out = df.copy()
    col = name or f"{value}_vs_baseline"
    out[col] = np.nan
    mask = pd.Series(baseline_mask, index=df.index)
    for _, g in _groups(out, by):
        base = g.loc[mask.loc[g.index], value]
        if len(base):
            out.loc[g.index, col] = g[value] / base.iloc[0]
    return out
