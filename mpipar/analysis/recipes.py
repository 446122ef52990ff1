"""Per-experiment analysis recipes: derived tables, figures and the headline of each driver's table.

A recipe takes the DataFrame of one `/results/<name>` table and the output
folder and returns a `Result`: derived tables (written as <name>_<key>.csv),
figure paths, and headline rows {headline, value, unit, baseline,
baseline_value, ratio, better} comparing mpipar with the baseline measured in
the same run (ratio = value / baseline_value). Recipes are registered by
table name; a table that holds several models (train_gpt's `arch`) is analysed
per model, its headlines under the experiment `<table>[<arch>]` (plain
`<table>` for gpt2); the columns they read are those the drivers write (results/README.md).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from . import figures, metrics
from .load import DEFAULT_ARCH, by_arch


@dataclasses.dataclass
class Result:
    derived: dict = dataclasses.field(default_factory=dict)
    figures: list = dataclasses.field(default_factory=list)
    headlines: list = dataclasses.field(default_factory=list)


RECIPES: dict = {}
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all")
# study driver name -> the table its recipe reads (for the summary's status column); [arch]: the
# rows of that model only (train_gpt.py --arch llama writes the same tables as the gpt2 run)
DRIVER_TABLES = {"collectives": "collectives", "tensor": "tensor_parallel", "pipeline": "pipeline",
                 "sequence": "sequence_parallel", "gpt": "train_gpt", "llama": "train_gpt[llama]",
                 "zero": "zero_memory"}


def recipe(table: str):
    """Register a recipe for the table `/results/<table>`."""
    def deco(fn):
        RECIPES[table] = fn
        return fn
    return deco


def find(table: str):
    """The recipe of a table name, or None."""
    return RECIPES.get(table)


def table_prefix(driver: str) -> str:
    """The table name of a study driver (its headline rows carry this experiment name)."""
    return DRIVER_TABLES.get(driver, driver)


def headline(name: str, value, unit: str, baseline: str | None = None, baseline_value=None,
             better: str = "higher") -> dict:
    """A summary row; ratio = value / baseline_value."""
    def num(x):
        return None if x is None or pd.isna(x) else float(x)

    value, baseline_value = num(value), num(baseline_value)
    ratio = value / baseline_value if value is not None and baseline_value else np.nan
    return {"headline": name, "value": value, "unit": unit, "baseline": baseline,
            "baseline_value": baseline_value, "ratio": ratio, "better": better}


def _one(df: pd.DataFrame, col: str, **where):
    """Median of `col` over the rows matching `where` (None if there is none)."""
    mask = np.ones(len(df), dtype=bool)
    for k, v in where.items():
        mask &= (df[k] == v).to_numpy()
    vals = df.loc[mask, col].dropna()
    return float(vals.median()) if len(vals) else None


def _human(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes} B"


@recipe("collectives")
def collectives(df: pd.DataFrame, out: Path) -> Result:
    """Alpha-beta fits per impl, busbw as a fraction of memcpy, busbw-vs-size figures per op."""
    res = Result()
    coll = df[df["op"].isin(COLLECTIVES)]
    res.derived["alpha_beta"] = metrics.fit_alpha_beta(coll, time="time_s", by=("impl", "dtype"))
    if "memcpy_GBps" in df.columns:
        res.derived["vs_memcpy"] = metrics.vs_limit(coll, "busbw_GBps", "memcpy_GBps", "busbw_frac_of_memcpy")[
            ["op", "impl", "nbytes", "world_size", "busbw_GBps", "memcpy_GBps", "busbw_frac_of_memcpy"]]
    limit = "memcpy_GBps" if "memcpy_GBps" in df.columns else None
    ranks = int(df["world_size"].max())
    for op in sorted(coll["op"].unique()):
        res.figures.append(figures.busbw_plot(coll[coll["op"] == op], out / f"collectives_busbw_{op}.png",
                                              hue=("impl",), limit=limit,
                                              title=f"{op}: bus bandwidth vs size, {ranks} ranks"))
    ar = coll[coll["op"] == "all_reduce"]
    if "mode" in ar.columns:  # loop,single runs: the headline reads the back-to-back calls
        ar = ar[ar["mode"].fillna("loop").isin(["loop", ""])]
    if len(ar):
        size = int(ar["nbytes"].max())
        name = f"all_reduce busbw, mpipar auto, {_human(size)}"
        value = _one(ar, "busbw_GBps", impl="auto", nbytes=size)
        for base in ("gloo", "mpi4py"):
            if (ar["impl"] == base).any():
                base_value = _one(ar, "busbw_GBps", impl=base, nbytes=size)
                res.headlines.append(headline(name + _why_below(ar, size, value, base, base_value), value, "GB/s",
                                              base, base_value))
        limit = _one(df, "busbw_GBps", op="memcpy", nbytes=size)
        if limit:
            res.headlines.append(headline(name, value, "GB/s", "memcpy limit", limit))
    return res


def _why_below(ar: pd.DataFrame, size: int, value, base: str, base_value) -> str:
    """What the all_reduce headline adds when mpipar's auto is below raw MPI: the cost it pays
    on purpose, and the same run's figure for a symmetric tensor, which avoids the copies."""
    if base != "mpi4py" or value is None or not base_value or value >= base_value:
        return ""
    from ..comm import tuning

    sym = _one(ar, "busbw_GBps", impl="auto_sym", nbytes=size)
    tail = f"; a symmetric tensor (auto_sym) gets {sym / base_value:.2f}x" if sym else ""
    staged = (", and a plain tensor is copied in and out of shared memory when ranks outnumber cores"
              if tuning.stages_in_shm("all_reduce", size) else "")
    return (" (below raw MPI: each call first agrees on its arguments across ranks, a barrier "
            f"MPI skips{staged}{tail})")


@recipe("tensor_parallel")
def tensor_parallel(df: pd.DataFrame, out: Path) -> Result:
    """Strong scaling over TP per (block, hidden, method); time vs TP; mpipar vs serial and torch."""
    res = Result()
    par = df[df["method"] != "serial"]
    if len(par):
        res.derived["scaling"] = metrics.scaling(par, "tp", "time_s", by=["block", "hidden", "method"])
    hidden = int(df["hidden"].max())
    for block in sorted(df["block"].unique()):
        part = df[(df["block"] == block) & (df["hidden"] == hidden)]
        res.figures.append(figures.line_plot(part, "tp", "time_s", out / f"tensor_parallel_{block}_time.png",
                                             hue="method", logy=True, xlabel="TP size", ylabel="fwd+bwd step (s)",
                                             title=f"{block}, hidden {hidden}: step time vs TP"))
        if "scaling" in res.derived:
            s = res.derived["scaling"]
            s = s[(s["block"] == block) & (s["hidden"] == hidden)]
            res.figures.append(figures.line_plot(s, "tp", "speedup", out / f"tensor_parallel_{block}_speedup.png",
                                                 hue="method", ideal="linear", xlabel="TP size",
                                                 title=f"{block}, hidden {hidden}: strong-scaling speedup"))
    for block in sorted(df["block"].unique()):
        part = df[(df["block"] == block) & (df["hidden"] == hidden)]
        tp = int(part.loc[part["method"] == "mpipar", "tp"].max()) if (part["method"] == "mpipar").any() else None
        if tp is None:
            continue
        name = f"{block} step, mpipar TP={tp}, hidden {hidden}"
        value = _one(part, "time_s", method="mpipar", tp=tp)
        res.headlines.append(headline(name, value, "s", "serial 1 rank", _one(part, "time_s", method="serial"),
                                      better="lower"))
        if (part["method"] == "torch").any():
            res.headlines.append(headline(name, value, "s", f"torch TP={tp} (gloo)",
                                          _one(part, "time_s", method="torch", tp=tp), better="lower"))
    return res


def _weak_sequence(df: pd.DataFrame) -> pd.DataFrame:
    """Weak scaling of each SP method: points with the same tokens per rank, serial SDPA as N=1.

    Attention work grows as seq^2, so at fixed tokens per rank the work per
    rank grows as N: `work_efficiency` = efficiency x (seq/seq0)^2 / (N/N0) is
    1 for perfect scaling (plain `efficiency` T0/T would ideally fall as N0/N).
    """
    d = df.assign(tokens_per_rank=df["seq"] // df["sp"])
    serial = d[d["method"] == "serial"]
    rows = [pd.concat([serial.assign(method=m), d[d["method"] == m]]) for m in sorted(set(d["method"]) - {"serial"})]
    if not rows:
        return pd.DataFrame()
    both = pd.concat(rows, ignore_index=True)
    keep = both.groupby(["method", "tokens_per_rank"])["sp"].transform("nunique") > 1
    weak = metrics.scaling(both[keep], "sp", "time_s", by=["method", "tokens_per_rank"], kind="weak")
    seq0 = weak["tokens_per_rank"] * weak["baseline_n"]
    weak["work_efficiency"] = weak["efficiency"] * (weak["seq"] / seq0) ** 2 / (weak["sp"] / weak["baseline_n"])
    return weak


@recipe("sequence_parallel")
def sequence_parallel(df: pd.DataFrame, out: Path) -> Result:
    """Strong scaling vs serial SDPA per seq, weak scaling at fixed tokens per rank, memory/time vs seq."""
    res = Result()
    serial = df[df["method"] == "serial"].groupby("seq")["time_s"].min()
    par = df[df["method"] != "serial"].copy()
    par["speedup"] = par["seq"].map(serial) / par["time_s"]
    par["efficiency"] = par["speedup"] / par["sp"]
    res.derived["scaling"] = par
    weak = _weak_sequence(df)
    if len(weak):
        res.derived["weak_scaling"] = weak
        res.figures.append(figures.line_plot(weak, "sp", "work_efficiency", out / "sequence_parallel_weak.png",
                                             hue=["method", "tokens_per_rank"], ideal="one", xlabel="SP size",
                                             ylabel="weak-scaling efficiency per unit of work",
                                             title="sequence parallel, fixed tokens per rank (work ~ seq^2)"))
    res.figures.append(figures.memory_time_plot(df, out / "sequence_parallel_memory_time.png", seq="seq",
                                                memory="peak_act_bytes", time="time_s", hue=("method", "sp")))
    seq, sp = int(df["seq"].max()), int(df["sp"].max())
    for method in ("ring-zigzag", "ulysses"):
        if not ((df["method"] == method) & (df["sp"] == sp) & (df["seq"] == seq)).any():
            continue
        label = f"{method} SP={sp}, seq {seq}"
        res.headlines.append(headline(f"{label}: fwd+bwd", _one(df, "time_s", method=method, sp=sp, seq=seq), "s",
                                      "serial SDPA", _one(df, "time_s", method="serial", seq=seq), better="lower"))
        res.headlines.append(headline(f"{label}: peak activations/rank",
                                      _one(df, "peak_act_bytes", method=method, sp=sp, seq=seq), "B",
                                      "serial SDPA", _one(df, "peak_act_bytes", method="serial", seq=seq),
                                      better="lower"))
    return res


@recipe("pipeline")
def pipeline(df: pd.DataFrame, out: Path) -> Result:
    """Measured vs simulated bubble, step time vs m per schedule; mpipar vs torch.distributed.pipelining."""
    res = Result()
    mine = df[df["impl"] == "mpipar"]
    if {"bubble_measured", "bubble_simulated"} <= set(mine.columns) and len(mine):
        res.derived["bubble"] = metrics.bubble_error(mine)[
            ["schedule", "pp", "microbatches", "chunks", "bubble_measured", "bubble_simulated", "bubble_error"]
            + [c for c in ("bubble_theory",) if c in mine.columns]]
        res.derived["scaling"] = metrics.scaling(mine, "pp", "time_s", by=["schedule", "microbatches"])
    p = int(df["pp"].max())
    at_p = df[df["pp"] == p].assign(label=lambda d: d["impl"] + " " + d["schedule"])
    res.figures.append(figures.line_plot(at_p, "microbatches", "time_s", out / "pipeline_step_time.png",
                                         hue="label", logx=True, xlabel="microbatches m", ylabel="step time (s)",
                                         title=f"pipeline step time, p={p}"))
    if "bubble" in res.derived:
        b = res.derived["bubble"]
        b = b[b["pp"] == p].melt(id_vars=["schedule", "microbatches"], var_name="kind", value_name="bubble",
                                 value_vars=["bubble_measured", "bubble_simulated"])
        res.figures.append(figures.line_plot(b, "microbatches", "bubble", out / "pipeline_bubble.png",
                                             hue=["schedule", "kind"], logx=True, xlabel="microbatches m",
                                             ylabel="bubble fraction", title=f"measured vs simulated bubble, p={p}"))
    for name in ("1f1b", "gpipe", "interleaved-1f1b", "zb-h1"):
        pts = mine[(mine["schedule"] == name) & (mine["pp"] == p)]
        if pts.empty:
            continue
        m = int(pts["microbatches"].max())
        label = f"{name} step, p={p}, m={m}"
        value = _one(pts, "time_s", microbatches=m)
        torch_rows = df[(df["impl"] == "torch") & (df["pp"] == p) & (df["microbatches"] == m)
                        & (df.get("mpipar_schedule", df["schedule"]) == name)]
        if len(torch_rows):
            res.headlines.append(headline(label, value, "s", f"torch {torch_rows['schedule'].iloc[0]}",
                                          float(torch_rows["time_s"].median()), better="lower"))
        if "bubble_measured" in pts.columns:
            res.headlines.append(headline(f"{name} bubble, p={p}, m={m}", _one(pts, "bubble_measured", microbatches=m),
                                          "", "simulated", _one(pts, "bubble_simulated", microbatches=m),
                                          better="lower"))
        if name == "1f1b":
            break
    return res


def _qualified(experiment: str) -> tuple[str, str]:
    """'train_gpt_layouts[llama]' -> ('train_gpt_layouts', 'llama'); no brackets -> (name, '')."""
    base, _, rest = experiment.partition("[")
    return base, rest.rstrip("]")


def experiment_name(table: str, arch: str) -> str:
    """The summary's experiment of a table's rows of one model: the table name for gpt2 (as before
    the `arch` column), `<table>[<arch>]` for any other model."""
    return table if arch == DEFAULT_ARCH else f"{table}[{arch}]"


def driver_matches(driver: str, experiment: str) -> bool:
    """Are the summary rows of `experiment` the results of the study driver `driver`? The table
    name starts with the driver's table and the model qualifier ([llama]) is the same."""
    prefix, arch = _qualified(table_prefix(driver))
    base, qualifier = _qualified(experiment)
    return base.startswith(prefix) and qualifier == arch


def _suffix(arch: str) -> str:
    """File-name suffix of a per-model figure: none for gpt2 (the names from before `arch`)."""
    return "" if arch == DEFAULT_ARCH else f"_{arch}"


@recipe("train_gpt")
def train_gpt(df: pd.DataFrame, out: Path) -> Result:
    """Loss curves per layout and the loss after the last step vs the first, for each model (`arch`)
    on its own: train_gpt_loss.png for gpt2, train_gpt_loss_<arch>.png for the others."""
    res = Result()
    parts = by_arch(df)
    for arch, d in parts:
        res.figures.append(figures.line_plot(d, "step", "loss", out / f"train_gpt_loss{_suffix(arch)}.png",
                                             hue="layout", xlabel="step", ylabel="cross-entropy (nats)",
                                             title=f"{arch} training loss"))
        for layout, g in d.sort_values("step").groupby("layout", sort=True):
            first, last = g.iloc[0], g.iloc[-1]
            res.headlines.append({**headline(f"{arch} loss after step {int(last['step'])}, {layout}", last["loss"],
                                             "nats", f"loss at step {int(first['step'])}", first["loss"],
                                             better="lower"), "experiment": experiment_name("train_gpt", arch)})
            if d["layout"].nunique() > 2:
                break  # the per-layout table gives the rest
    return res


@recipe("train_gpt_layouts")
def train_gpt_layouts(df: pd.DataFrame, out: Path) -> Result:
    """Tokens/s per dp x pp x sp x tp layout, the models (`arch`) side by side; per model the
    fastest layout vs pure data parallelism and the planner's predicted step time against the
    measured one (when the table has it). Derived: `by_arch`, tokens/s with one column per model."""
    res = Result()
    parts = by_arch(df)
    both = pd.concat([d.assign(arch=arch) for arch, d in parts], ignore_index=True)
    res.derived["by_arch"] = both.pivot_table(index="layout", columns="arch", values="tokens_per_s",
                                              aggfunc="median", sort=False).reset_index()
    res.derived["by_arch"].columns.name = None
    if "params" in both.columns:  # the legend says how big each model is
        both["model"] = [f"{a} ({p / 1e6:.2f}M params)" if p == p else a for a, p in zip(both["arch"], both["params"])]
    res.figures.append(figures.bar_plot(both, "layout", "tokens_per_s", out / "train_gpt_layouts.png",
                                        hue=("model" if "model" in both.columns else "arch") if len(parts) > 1
                                        else None, ylabel="tokens/s",
                                        title="tokens/s per layout (dp-pp-sp-tp)"
                                        + (", per model" if len(parts) > 1 else "")))
    for arch, d in parts:
        experiment = experiment_name("train_gpt_layouts", arch)
        if "pred_step_s" in d.columns and d["pred_step_s"].notna().any():
            res.figures.append(figures.predicted_plot(d, "step_s", "pred_step_s", "layout",
                                                      out / f"train_gpt_predicted{_suffix(arch)}.png",
                                                      title=f"{arch} step time: mpipar.plan vs measured"))
            err = (d["pred_step_s"] / d["step_s"] - 1).abs().dropna()
            res.headlines.append({**headline(f"{arch} step time prediction, mean |predicted / measured - 1|",
                                             err.mean(), "", better="lower"), "experiment": experiment})
        best = d.loc[d["tokens_per_s"].idxmax()]
        dp_only = d[(d["pp"] == 1) & (d["sp"] == 1) & (d["tp"] == 1)]
        if len(dp_only):
            base = dp_only.iloc[0]
            res.headlines.append({**headline(f"{arch} tokens/s, fastest layout {best['layout']}",
                                             best["tokens_per_s"], "tokens/s", f"data parallel {base['layout']}",
                                             base["tokens_per_s"]), "experiment": experiment})
    return res


@recipe("zero_memory")
def zero_memory(df: pd.DataFrame, out: Path) -> Result:
    """Bytes of model state per parameter held by a rank, per ZeRO stage at the widest dp of the sweep,
    against what that stage keeps by construction (a ratio above 1 is a copy too many), with the
    ZeRO paper's closed form in the name: zero=0 is plain AdamW on the bf16 parameters (8 B), not
    the paper's mixed-precision baseline (16 B). zero_memory.png is drawn by experiments/zero.py."""
    res = Result()
    dp = int(df["dp"].max())
    d = df[df["dp"] == dp]
    for z in sorted(int(z) for z in d["zero"].unique()):
        paper = _one(d, "closed_form_per_param", zero=z)
        paper = f" (ZeRO paper: {paper:g})" if paper is not None else ""
        res.headlines.append(headline(f"zero={z} model state per parameter, dp={dp}{paper}",
                                      _one(d, "model_state_per_param", zero=z), "B/param", "mpipar's form",
                                      _one(d, "mpipar_form_per_param", zero=z), better="lower"))
    return res

