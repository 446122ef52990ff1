"""The prediction next to the measurement, for every run of experiments/train_gpt.py.

    row.update(plan.runs.train_gpt_prediction(gpt_config, cfg, (dp, pp, sp, tp), row, tracer.spans))

adds pred_* columns (step time, each component, memory, activations) and the
measured counterparts the run has (step time, rank 0's optimizer and
gradient-sync spans per step, the largest activation peak and RSS), plus the
relative errors. `format_predicted(rows)` prints them side by side. Nothing
here raises: a layout the model cannot describe gets NaN and a note.

A shared CPU host runs at the speed the other processes leave it, which can
change several-fold within minutes. So on calibrated CPU systems every rank
runs calibrate's compute probe (a fraction of a second) when the hook is called,
all at once: `host_load` is how much slower the host is then than at
calibration (1 = as calibrated) and `pred_step_at_load_s` the prediction at
that speed. It is a diagnostic: the probe sees the host after the steps, not
during them, so `pred_step_s` and the errors stay at the calibrated speed.
"""
from __future__ import annotations

import math
import statistics

from ..errors import MpiparError
from . import host
from .estimate import COMPONENTS, estimate
from .spec import Layout, ModelSpec
from .system import System

DEFAULT_SYSTEM = "local"  # this host's calibration, else the shipped local-cpu (with a warning note)
FALLBACK_NOTE = ("local-cpu, calibrated on another host: predictions may be off several-fold; "
                 "`python -m mpipar.plan calibrate` measures this one in about a minute")
UNITS = {**{f"pred_{c}_s": "s" for c in COMPONENTS}, "pred_step_s": "s", "pred_memory_bytes": "B",
         "pred_activation_bytes": "B", "pred_rss_bytes": "B", "measured_optimizer_s": "s",
         "measured_grad_sync_s": "s", "pred_step_at_load_s": "s"}
_SYSTEMS: dict = {}


def _system(name) -> tuple[System, str]:
    """(the System, how to name it in the results)."""
    if name not in _SYSTEMS:
        if name == "local":
            try:
                system = System.load("local")
                _SYSTEMS[name] = system, f"local (this host's calibration, {system.path})"
            except MpiparError:
                shipped = System.load("local-cpu")
                same = host.matches(shipped.data)  # shipped from a host like this one: no warning
                _SYSTEMS[name] = shipped, "local-cpu (calibrated on a host like this one)" if same else FALLBACK_NOTE
        else:
            system = System.load(name)
            _SYSTEMS[name] = system, system.name
    return _SYSTEMS[name]


def layout_of(cfg, layout: tuple) -> Layout:
    """The plan.Layout of one train_gpt layout (dp, pp, sp, tp) under its Config."""
    dp, pp, sp, tp = layout
    m = int(getattr(cfg, "microbatches", 1))
    batch = int(cfg.batch)
    if batch % (dp * m):
        raise MpiparError(f"batch {batch} does not split into dp {dp} x {m} microbatches")
    dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(str(getattr(cfg, "dtype", "float32")),
                                                                          "fp32")
    return Layout(tp=tp, pp=pp, dp=dp, sp=sp, sp_mode=getattr(cfg, "sp_mode", "ring"),
                  num_chunks=int(getattr(cfg, "chunks", 1)) if pp > 1 else 1,
                  schedule=cfg.schedule if pp > 1 else "1f1b", micro_batch=batch // (dp * m), global_batch=batch,
                  sequence_parallel=tp > 1,            # ParallelGPT's default
                  recompute="full" if getattr(cfg, "checkpointing", False) else "none",
                  zero=int(getattr(cfg, "zero", 0) or 0), dtype=dtype)


def host_load(system: System, world: int) -> float | None:
    """How much slower this host computes now than at calibration, with `world` ranks busy.

    Every rank of the job must call it at the same moment (all run the probe at once);
    None on systems without a calibrated probe (accelerators)."""
    probes = system.data.get("measurements", {}).get("probe_s", {})
    if not system.cores or "1" not in probes:
        return None
    from .calibrate_comm import compute_probe
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as calibrated
    try:
        now = compute_probe(torch)
    finally:
        torch.set_num_threads(threads)
    expected = float(probes[str(world)]) if str(world) in probes else float(probes["1"]) * system._slowdown(world)
    return now / expected


def _per_step(spans, name: str, steps: int) -> float:
    """Rank 0's mean seconds per step in spans called `name` (NaN when none)."""
    total = sum(s["t_end"] - s["t_start"] for s in spans or () if s.get("name") == name)
    return total / steps if total and steps else math.nan


def train_gpt_prediction(gpt_config, cfg, layout: tuple, measured: dict, spans=None, system=None) -> dict:
    """pred_* and error columns for one layout's summary row (`measured` has step_s, max_rss_bytes, ...)."""
    out = {f"pred_{c}_s": math.nan for c in COMPONENTS}
    out.update(pred_step_s=math.nan, pred_memory_bytes=math.nan, pred_activation_bytes=math.nan,
               pred_rss_bytes=math.nan, step_error=math.nan, activation_error=math.nan, rss_error=math.nan,
               pred_note="")
    steps = int(getattr(cfg, "steps", 0) or 0)
    out["measured_optimizer_s"] = _per_step(spans, "optimizer", steps)
    out["measured_grad_sync_s"] = _per_step(spans, "grad_sync", steps)
    out["host_load"] = out["pred_step_at_load_s"] = math.nan
    try:
        system, label = _system(system or getattr(cfg, "plan_system", None) or DEFAULT_SYSTEM)
        spec, plan_layout = ModelSpec.from_config(gpt_config), layout_of(cfg, layout)
        load = host_load(system, plan_layout.world_size)
        est = estimate(spec, system, plan_layout)
        if load is not None:
            out["host_load"] = load
            out["pred_step_at_load_s"] = estimate(spec, system.with_load(load), plan_layout).step_time
    except MpiparError as e:
        out["pred_note"] = str(e)
        return out
    out.update({f"pred_{c}_s": v for c, v in est.breakdown.items()})
    out["pred_step_s"] = est.step_time
    out["pred_memory_bytes"] = est.memory
    out["pred_activation_bytes"] = est.memory_breakdown["activations"]
    out["pred_rss_bytes"] = est.memory + est.runtime_memory
    out["pred_note"] = label
    for key, pred, meas in (("step_error", est.step_time, measured.get("step_s")),
                            ("activation_error", out["pred_activation_bytes"],
                             measured.get("max_activation_peak_bytes")),
                            ("rss_error", out["pred_rss_bytes"], measured.get("max_rss_bytes"))):
        if meas:
            out[key] = pred / meas - 1.0
    return out


def format_predicted(rows: list[dict]) -> str:
    """Predicted next to measured, one line per layout, and the mean and worst step-time errors."""
    lines = [f"\n{'layout':<20}{'step s':>9}{'pred s':>9}{'error':>8}   {'act MiB':>8}{'pred':>8}   "
             f"{'RSS MiB':>8}{'pred':>8}   {'load':>5}  biggest predicted components"]
    errs = []
    for r in rows:
        if not isinstance(r.get("pred_step_s"), float) or math.isnan(r["pred_step_s"]):
            lines.append(f"{r['layout']:<20}{r['step_s']:>9.3f}   (no prediction: {r.get('pred_note', '')})")
            continue
        errs.append(abs(r["step_error"]))
        comps = sorted(((r[f"pred_{c}_s"], c) for c in COMPONENTS), reverse=True)[:3]
        lines.append(f"{r['layout']:<20}{r['step_s']:>9.3f}{r['pred_step_s']:>9.3f}{r['step_error']:>+8.0%}   "
                     f"{r.get('max_activation_peak_bytes', math.nan) / 2**20:>8.1f}"
                     f"{r['pred_activation_bytes'] / 2**20:>8.1f}   "
                     f"{r.get('max_rss_bytes', math.nan) / 2**20:>8.0f}{r['pred_rss_bytes'] / 2**20:>8.0f}   "
                     f"{r.get('host_load', math.nan):>5.2f}  "
                     + ", ".join(f"{c} {v * 1e3:.1f} ms" for v, c in comps))
    if errs:
        lines.append(f"step time: mean |error| {statistics.mean(errs):.0%}, worst {max(errs):.0%} "
                     f"(system {rows[0].get('pred_note', '')})")
        at_load = [abs(r["pred_step_at_load_s"] / r["step_s"] - 1) for r in rows
                   if isinstance(r.get("pred_step_at_load_s"), float) and not math.isnan(r["pred_step_at_load_s"])]
        if at_load:  # the host's speed now against the calibration's (the load column): a calibration
            # made in a faster or slower minute than the run shows here, not in the model
            lines.append(f"at the load measured now (pred_step_at_load_s): mean |error| "
                         f"{statistics.mean(at_load):.0%}, worst {max(at_load):.0%}")
        best_pred = min((r for r in rows if r.get("step_error") == r.get("step_error")),
                        key=lambda r: r["pred_step_s"])
        fastest = min(rows, key=lambda r: r["step_s"])
        lines.append(f"predicted best {best_pred['layout']} measured {best_pred['step_s']:.3f} s; fastest "
                     f"{fastest['layout']} {fastest['step_s']:.3f} s ({best_pred['step_s'] / fastest['step_s'] - 1:+.0%})")
    return "\n".join(lines)
