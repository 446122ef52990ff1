"""Figures of scaling studies (matplotlib, headless Agg backend), one PNG per call.

- `line_plot`: y against x, one line per value of `hue` (scaling curves:
  speedup/efficiency vs ranks; time vs size), optional log axes and an ideal line.
- `busbw_plot`: bus bandwidth against message size per implementation, with
  the memcpy bandwidth as the physical limit.
- `memory_time_plot`: peak memory and step time against sequence length.
- `bar_plot`: one bar per category (tokens/s per parallel layout), optionally one
  bar per `hue` value side by side (tokens/s per layout of every model).
Every function returns the path written, or None when there was nothing to plot.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def save_figure(fig, path) -> Path:
    """Write `fig` to `path` (folders made), then close it. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _lines(ax, df: pd.DataFrame, x: str, y: str, hue) -> int:
    hues = [c for c in ([hue] if isinstance(hue, str) else (hue or [])) if c in df.columns]
    groups = df.groupby(hues, dropna=False, sort=True) if hues else [((), df)]
    count = 0
    for key, g in groups:
        g = g.dropna(subset=[x, y]).groupby(x, sort=True)[y].median()
        if g.empty:
            continue
        key = key if isinstance(key, tuple) else (key,)
        ax.plot(g.index, g.values, marker="o", label=" ".join(map(str, key)) or y)
        count += 1
    return count


def line_plot(df: pd.DataFrame, x: str, y: str, path, hue=None, title: str = "", xlabel: str = "",
              ylabel: str = "", logx: bool = False, logy: bool = False, ideal: str | None = None):
    """y vs x with one line per `hue` group (median over repeats). ideal: 'linear' or 'one'."""
    if df is None or df.empty or x not in df.columns or y not in df.columns:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if not _lines(ax, df, x, y, hue):
        plt.close(fig)
        return None
    xs = np.sort(df[x].dropna().unique())
    if ideal == "linear":
        ax.plot(xs, xs / xs[0], "k--", lw=1, label="ideal")
    elif ideal == "one":
        ax.axhline(1.0, color="k", ls="--", lw=1, label="ideal")
    ax.set_xscale("log", base=2) if logx else None
    ax.set_yscale("log") if logy else None
    ax.set(title=title, xlabel=xlabel or x, ylabel=ylabel or y)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def busbw_plot(df: pd.DataFrame, path, size: str = "nbytes", busbw: str = "busbw_GBps", hue=("impl",),
               limit: str | None = "memcpy_GBps", title: str = "Bus bandwidth vs message size"):
    """Bus bandwidth vs message size (log-log) per implementation; memcpy limit dashed."""
    if df is None or df.empty or size not in df.columns or busbw not in df.columns:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    _lines(ax, df[df[busbw] > 0], size, busbw, list(hue))
    if limit and limit in df.columns and df[limit].notna().any():
        ax.axhline(float(df[limit].max()), color="k", ls="--", lw=1, label="memcpy limit")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(title=title, xlabel="message size (bytes)", ylabel="bus bandwidth (GB/s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def memory_time_plot(df: pd.DataFrame, path, seq: str = "seq_len", memory: str = "peak_activation_bytes",
                     time: str | None = "time_s", hue=("impl",), title: str = "Memory and time vs sequence length"):
    """Two panels against sequence length: peak memory (MiB) and step time."""
    if df is None or df.empty or seq not in df.columns or memory not in df.columns:
        return None
    panels = 2 if time and time in df.columns else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.0 * panels, 4.2), squeeze=False)
    mib = df.assign(_mib=df[memory] / 2 ** 20)
    _lines(axes[0, 0], mib, seq, "_mib", list(hue))
    axes[0, 0].set(xlabel="sequence length", ylabel=f"{memory} (MiB)", title=title)
    if panels == 2:
        _lines(axes[0, 1], df, seq, time, list(hue))
        axes[0, 1].set(xlabel="sequence length", ylabel=time, title="step time")
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def bar_plot(df: pd.DataFrame, x: str, y: str, path, title: str = "", ylabel: str = "", hue: str | None = None):
    """One bar per row: y (e.g. tokens/s) per category x (e.g. a parallel layout); with `hue`
    (e.g. the model's arch) one bar per hue value side by side within each category (median
    over repeats; a category a hue value lacks has no bar there)."""
    if df is None or df.empty or x not in df.columns or y not in df.columns:
        return None
    if hue is None or hue not in df.columns:
        fig, ax = plt.subplots(figsize=(max(6.4, 0.8 * len(df)), 4.2))
        ax.bar(df[x].astype(str), df[y])
    else:
        cats = list(dict.fromkeys(df[x].astype(str)))  # first-seen order, as the single-series plot
        groups = list(dict.fromkeys(df[hue].astype(str)))
        table = df.assign(_x=df[x].astype(str), _h=df[hue].astype(str)).groupby(["_x", "_h"])[y].median()
        fig, ax = plt.subplots(figsize=(max(6.4, 0.5 * len(cats) * len(groups) + 1.5), 4.2))
        width, pos = 0.8 / len(groups), np.arange(len(cats))
        for i, g in enumerate(groups):
            vals = [table.get((c, g), np.nan) for c in cats]
            ax.bar(pos + (i - (len(groups) - 1) / 2) * width, vals, width, label=g)
        ax.set_xticks(pos, cats)
        ax.legend(fontsize=8)
    ax.set(title=title, ylabel=ylabel or y)
    ax.tick_params(axis="x", labelrotation=30)
    ax.grid(True, axis="y", alpha=0.3)
    return save_figure(fig, path)


def predicted_plot(df: pd.DataFrame, measured: str, predicted: str, label: str, path, title: str = "",
                   unit: str = "s"):
    """Predicted against measured, one labelled point per row, with the y = x line."""
    if df is None or df.empty or measured not in df.columns or predicted not in df.columns:
        return None
    d = df[[label, measured, predicted]].dropna()
    if d.empty:
        return None
    fig, ax = plt.subplots(figsize=(5.6, 5.0))
    ax.scatter(d[measured], d[predicted])
    for _, r in d.iterrows():
        ax.annotate(str(r[label]), (r[measured], r[predicted]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    lo = min(d[measured].min(), d[predicted].min()) * 0.8
    hi = max(d[measured].max(), d[predicted].max()) * 1.2
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="predicted = measured")
    ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel=f"measured ({unit})", ylabel=f"predicted ({unit})", title=title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
