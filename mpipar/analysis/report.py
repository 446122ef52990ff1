"""The analysis of a study: tables -> CSV, derived metrics -> CSV, figures -> PNG, a summary.

    report = analyze(["results/scaling/20250101T000000Z"], out_dir)
    report["summary"]    # DataFrame: experiment, headline, value, unit, baseline, baseline_value, ratio
    print(format_summary(report["summary"]))

Every `/results/<name>` table is written as <name>.csv. Tables with a recipe
(`recipes.RECIPES`, matched by name) also get derived tables (<name>_<what>.csv:
scaling efficiency, alpha-beta fits, bubble errors, ...), figures, and headline
rows for the summary: the experiment's headline figure and its ratio to the
baseline measured in the same run. A table holding several models (the `arch`
column of train_gpt's tables) is analysed per model: its headlines are under
`<table>[<arch>]` (plain `<table>` for gpt2), never mixed. The summary is written as summary.csv.
"""
from __future__ import annotations

import traceback
from pathlib import Path

import pandas as pd

from . import recipes
from .pipeline_timeline import plot_timelines
from .load import h5_files, load, load_spans

SUMMARY_COLUMNS = ["experiment", "headline", "value", "unit", "baseline", "baseline_value", "ratio", "better"]


def write_csv(df: pd.DataFrame, path: Path) -> Path:
    """`df` as CSV (without the pandas index)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return path


def analyze(paths, out_dir, manifest: dict | None = None) -> dict:
    """Analyse the HDF5 files under `paths`; write CSV and PNG into `out_dir`.

    Returns {"tables": {name: DataFrame}, "csv": [paths], "figures": [paths],
    "summary": DataFrame, "errors": [messages]}. A recipe that fails is
    reported in "errors" and the rest of the analysis goes on.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = h5_files(paths)
    tables = load(files)
    csvs, figs, rows, errors = [], [], [], []
    for name, df in tables.items():
        csvs.append(write_csv(df, out_dir / f"{name}.csv"))
        recipe = recipes.find(name)
        if recipe is None:
            continue
        try:
            result = recipe(df, out_dir)
        except Exception as e:  # one bad table must not hide the others
            errors.append(f"{name}: {type(e).__name__}: {e}")
            traceback.print_exc()
            continue
        for what, derived in result.derived.items():
            csvs.append(write_csv(derived, out_dir / f"{name}_{what}.csv"))
        figs += [p for p in result.figures if p]
        rows += [{"experiment": name, **r} for r in result.headlines]
    try:
        figs += plot_timelines([str(f) for f in files if _has_spans(f)], str(out_dir))
    except Exception as e:
        errors.append(f"pipeline timelines: {type(e).__name__}: {e}")
    summary = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    csvs.append(write_csv(summary, out_dir / "summary.csv"))
    return {"tables": tables, "csv": csvs, "figures": figs, "summary": summary, "errors": errors}


def _has_spans(path) -> bool:
    try:
        return not load_spans([path]).empty
    except Exception:
        return False


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def format_summary(summary: pd.DataFrame, manifest: dict | None = None) -> str:
    """A plain-text table: per experiment its headline, baseline and ratio (and driver status)."""
    header = ["experiment", "status", "headline", "value", "baseline", "ratio"]
    lines = []
    status = {k: v.get("status", "?") for k, v in (manifest or {}).get("drivers", {}).items()}
    for _, r in summary.iterrows():
        unit = f" {r['unit']}" if isinstance(r["unit"], str) and r["unit"] else ""
        base = f"{r['baseline']} = {_fmt(r['baseline_value'])}{unit}" if isinstance(r["baseline"], str) else "-"
        ratio = _fmt(r["ratio"]) + ("x" if _fmt(r["ratio"]) != "-" else "")
        lines.append([r["experiment"], _status_of(r["experiment"], status), r["headline"],
                      _fmt(r["value"]) + unit, base, ratio])
    shown = {ln[0] for ln in lines}
    for name, st in status.items():
        if not any(recipes.driver_matches(name, s) for s in shown):
            lines.append([name, st, "(no results)", "-", "-", "-"])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths))  # noqa: E731
    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join(["", "Summary (ratio: headline / baseline, same run)", rule, fmt(header), rule,
                      *map(fmt, lines), rule])


def _status_of(table: str, status: dict) -> str:
    for name, st in status.items():
        if recipes.driver_matches(name, table):
            return st
    return "ok" if not status else "-"
