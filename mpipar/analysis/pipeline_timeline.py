"""Pipeline timeline figures: stages as rows, F/B/W as coloured boxes, measured next to simulated.

    rows = sim_rows(pipeline.simulate("1f1b", 4, 8))          # simulated timeline
    rows = span_rows(spans_df)                                 # measured, from /spans of one point
    sim = simulate_point(row)          # what a /results/pipeline row's bubble_simulated came from
    figure(measured_rows, simulated_rows, "1f1b p=4 m=8", "out.png")
    plot_timelines(["results/pipeline.h5"], "figures/")        # one PNG per schedule

A timeline is a list (one entry per stage, stage 0 on top) of boxes
(op, microbatch, chunk, start, end). Like the papers' figures: forward boxes
blue, backward (input gradient) green, weight gradient orange; later chunks of
an interleaved schedule drawn lighter; the microbatch number inside each box.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .figures import save_figure  # noqa: E402

COLORS = {"F": "#4c72b0", "B": "#55a868", "W": "#dd8452"}
OPS = ("F", "B", "W")


def hop_seconds(steps) -> float:
    """Median time from the start of a send to the end of its receive, over the receives that were
    already waiting when the send began: what a traced step paid per p2p transfer, the waiter's
    wake-up included (NaN when no receive waited). `steps`: per traced step, the send and recv
    spans of every rank (dicts with name, direction, microbatch, virtual, t_start, t_end)."""
    hops = []
    for spans in steps:
        spans = list(spans)
        sent = {_message(s): s["t_start"] for s in spans if s["name"] == "send"}
        hops += [s["t_end"] - sent[_message(s)] for s in spans
                 if s["name"] == "recv" and _message(s) in sent and s["t_start"] <= sent[_message(s)]]
    return statistics.median(hops) if hops else float("nan")


def _message(span) -> tuple:
    """The transport's message key: (direction, microbatch, destination virtual stage)."""
    return span["direction"], span["microbatch"], span["virtual"]


def simulate_point(pt):
    """The simulation behind a /results/pipeline row's `bubble_simulated`: its schedule with the
    measured per-stage costs, the p2p time its traced steps paid (`hop_s`; `comm_s`, the
    ping-pong, in files without it or where no receive waited) and, where the stages shared
    `sim_cores` cores, each action's CPU time as its cost (the simulator shares the cores)."""
    from ..pipeline import simulate

    def number(key):
        value = pt.get(key)
        return float(value) if isinstance(value, (int, float, np.number)) and value == value else None

    cores = number("sim_cores") or None
    costs = {k: pt[f"{k}_s"] for k in "fbw"}
    column = "cpu_costs_per_stage" if cores else "costs_per_stage"
    if isinstance(pt.get(column), str) and pt[column]:
        costs = json.loads(pt[column])  # measured per stage
    comm = number("hop_s")
    return simulate(pt["schedule"], int(pt["pp"]), int(pt["microbatches"]), int(pt["chunks"]),
                    comm=pt["comm_s"] if comm is None else comm, cores=cores, **costs)


def sim_rows(result) -> list[list[tuple]]:
    """Boxes of a `pipeline.SimResult`."""
    return [[(a.op, a.microbatch, a.chunk, start, end) for a, start, end in row] for row in result.timeline]


def span_rows(spans: pd.DataFrame, num_stages: int | None = None) -> list[list[tuple]]:
    """Boxes of the F/B/W spans of one traced step (times from the earliest span, in seconds)."""
    ops = spans[spans["name"].isin(OPS)]
    if ops.empty:
        return []
    t0 = spans["t_start"].min()
    p = int(num_stages or ops["stage"].max() + 1)
    chunk = ops["chunk"] if "chunk" in ops.columns else pd.Series(0, index=ops.index)
    rows: list[list[tuple]] = [[] for _ in range(p)]
    for (_, s), c in zip(ops.iterrows(), chunk.fillna(0)):
        rows[int(s["stage"])].append((s["name"], int(s["microbatch"]), int(c),
                                      float(s["t_start"] - t0), float(s["t_end"] - t0)))
    return [sorted(r, key=lambda box: box[3]) for r in rows]


def draw(ax, rows: list[list[tuple]], title: str = "", unit: str = "") -> None:
    """Draw one timeline on `ax`: stage s is row s from the top."""
    end = max((box[4] for row in rows for box in row), default=1.0) or 1.0
    for s, row in enumerate(rows):
        for op, mb, chunk, start, stop in row:
            alpha = 1.0 if chunk == 0 else max(0.35, 1.0 - 0.3 * chunk)
            ax.broken_barh([(start, stop - start)], (s - 0.4, 0.8), facecolors=COLORS.get(op, "gray"),
                           edgecolors="white", linewidth=0.4, alpha=alpha)
            if (stop - start) > end / 70:
                ax.text((start + stop) / 2, s, str(mb), ha="center", va="center", fontsize=6, color="white")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"stage {s}" for s in range(len(rows))])
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, end * 1.01)
    ax.set_xlabel(f"time{f' ({unit})' if unit else ''}")
    ax.set_title(title, fontsize=9)
    handles = [matplotlib.patches.Patch(color=COLORS[o], label=o) for o in OPS
               if any(box[0] == o for row in rows for box in row)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)


def figure(measured, simulated, title: str, path) -> Path:
    """One PNG: measured timeline (seconds) above the simulated one (same costs)."""
    panels = [(r, t, u) for r, t, u in ((measured, "measured", "ms"), (simulated, "simulated", "ms"))
              if r]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 1.2 + 0.5 * sum(len(r) for r, _, _ in panels)),
                             squeeze=False)
    for ax, (rows, label, unit) in zip(axes[:, 0], panels):
        scaled = [[(o, mb, c, a * 1e3, b * 1e3) for o, mb, c, a, b in row] for row in rows]
        draw(ax, scaled, f"{title}: {label}", unit)
    return save_figure(fig, path)


def _pick(points: pd.DataFrame) -> pd.Series:
    """The point drawn for a schedule: the most stages, then m closest to 8."""
    best = points[points["pp"] == points["pp"].max()]
    return best.iloc[int(np.argmin(np.abs(best["microbatches"].to_numpy() - 8)))]


def plot_timelines(paths, out_dir, everything: bool = False) -> list[Path]:
    """Per mpipar schedule in the files' /results/pipeline: measured vs simulated timeline PNGs.

    everything=True draws every traced point instead of one per schedule.
    """
    from .load import load, load_spans

    table = load(paths).get("pipeline")
    spans = load_spans(paths)
    if table is None or table.empty or spans.empty or "impl" not in spans.columns:
        return []
    table = table[(table["impl"] == "mpipar") & table["f_s"].notna()]
    spans = spans[spans["impl"] == "mpipar"]
    written = []
    for (file, name), points in table.groupby(["file", "schedule"], sort=True):
        chosen = points.itertuples(index=False) if everything else [_pick(points)]
        for pt in chosen:
            pt = pt._asdict() if hasattr(pt, "_asdict") else pt.to_dict()
            p, m, v = int(pt["pp"]), int(pt["microbatches"]), int(pt["chunks"])
            mine = spans[(spans["file"] == file) & (spans["schedule"] == name) & (spans["pp"] == p)
                         & (spans["microbatches"] == m)]
            for col in ("run", "iteration"):  # the latest run (resumed files), its last traced step
                if col in mine.columns and len(mine):
                    mine = mine[mine[col] == mine[col].max()]
            sim = simulate_point(pt)
            title = (f"{name}, p={p}, m={m}" + (f", v={v}" if v > 1 else "")
                     + f": bubble measured {pt['bubble_measured']:.3f}, simulated {sim.bubble_fraction:.3f}")
            out = Path(out_dir) / f"pipeline_timeline_{name}_p{p}_m{m}.png"
            written.append(figure(span_rows(mine, p), sim_rows(sim), title, out))
    return written
