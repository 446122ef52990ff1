#!/usr/bin/env python3
"""Train a small GPT on the built-in character corpus, on any dp x pp x sp x tp layout.

    mpiexec -n 4 python experiments/train_gpt.py --tp 2 --pp 2 --steps 50
    mpiexec -n 4 python experiments/train_gpt.py --layouts all --steps 12   # the 8 layouts of 4 ranks
    mpiexec -n 4 python experiments/train_gpt.py --tp 2 --pp 2 --steps 20 --save ckpt/
    mpiexec -n 4 python experiments/train_gpt.py --tp 1 --pp 4 --steps 40 --resume ckpt/  # any layout
    mpiexec -n 4 python experiments/train_gpt.py --model llama-tiny --data tokens.bin --tp 2 --sp 2
    mpiexec -n 4 python experiments/train_gpt.py --init-from hf_folder/ --data tokens.bin --seq 256

Preemptible: SIGTERM or SIGUSR1 finishes the step in hand, saves into --save
(ckpt/step-NNNNNN/, atomic; --save-every K also every K steps, --keep N newest
kept) and exits 128 + signal. --resume DIR continues from DIR's newest complete
checkpoint up to --steps in all, with optimizer state, data position and RNG:
on the same layout every later loss equals the uninterrupted run's. The rows
of /results/train_gpt are written one per step (a killed run keeps them).

AdamW with gradient clipping by the global norm (--max-grad-norm), optional
bf16 autocast (--bf16), activation checkpointing (--checkpointing) and ZeRO
sharding over dp (--zero 1|2|3). The
default model has about 1M parameters (hidden 144, 4 layers, 4 heads, sequence
64, the corpus' 64-character vocabulary). Per step: loss, step time, tokens/s
and every rank's memory (RSS, autograd-saved activation bytes, device bytes;
activations on the warmup steps and a resumed run's first, 0 on the others)
go to HDF5 through mpipar.trace: /spans and /memory of every rank, the
per-step table /results/train_gpt and, with --layouts all, the per-layout
summary /results/train_gpt_layouts. Progress and a table are printed on rank 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from mpi4py import MPI

import mpipar
from mpipar import models
from mpipar.errors import require
from mpipar.flight.abort import install_abort_on_exception
from mpipar.plan import runs as plan_runs
from mpipar.trace import Tracer, write_table
from _model_source import Source
from _train_resume import Run  # (experiments/: checkpoints, signals, rows)

LAYOUTS_ALL = [(1, 1, 1, 4), (1, 4, 1, 1), (1, 1, 4, 1), (4, 1, 1, 1),
               (1, 2, 1, 2), (2, 1, 1, 2), (1, 2, 2, 1), (2, 2, 1, 1),
               (2, 1, 1, 1), (1, 1, 1, 2), (1, 2, 1, 1), (1, 1, 2, 1)]  # (dp, pp, sp, tp): 8 of 4 ranks, 4 of 2
UNITS = {"step_s": "s", "tokens_per_s": "tokens/s", "loss": "nats", "max_rss_bytes": "B",
         "max_activation_peak_bytes": "B", "tokens": "tokens"}


@dataclasses.dataclass
class Config:
    tp: int = 1
    pp: int = 1
    sp: int = 1
    dp: int | None = None
    layouts: str = ""
    steps: int = 50
    schedule: str = "1f1b"
    microbatches: int = 4
    chunks: int = 1
    batch: int = 16
    seq: int = 64
    hidden: int = 144
    heads: int = 4
    layers: int = 4
    tied: bool = False
    sp_mode: str = "ring"
    lr: float = 3e-3
    weight_decay: float = 0.1
    max_grad_norm: float | None = 1.0
    bf16: bool = False
    checkpointing: bool = False
    zero: int = 0
    dtype: str = "float32"
    seed: int = 0
    warmup: int = 2
    log_every: int = 5
    save: str = ""
    resume: str = ""
    save_every: int = 0
    keep: int = 2
    out: str = "results/train_gpt.h5"
    arch: str = "gpt2"     # gpt2 | llama (with the --hidden/--heads/--layers flags)
    model: str = ""        # a preset (models.PRESETS: llama-tiny, llama-160m, gpt2-small, ...) or a JSON file
    data: str = ""         # a token file (experiments/tokenize_text.py); default: the built-in corpus
    data_dtype: str = "uint16"
    init_from: str = ""    # a local Hugging Face save_pretrained folder (Llama or GPT-2)
    plan_system: str = "local"  # mpipar.plan system for the predicted-vs-measured columns ("local": this
    # host's calibration, else the shipped local-cpu)


def parse_args() -> Config:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true")
        elif f.name in ("dp", "max_grad_norm"):
            p.add_argument(flag, type=float if f.name == "max_grad_norm" else int, default=getattr(d, f.name))
        else:
            p.add_argument(flag, type=type(getattr(d, f.name)), default=getattr(d, f.name))
    p.add_argument("--no-clip", action="store_true", help="no gradient clipping")
    p.add_argument("--quick", action="store_true", help="tiny model, 4 steps unless --steps (smoke test)")
    a = vars(p.parse_args())
    no_clip, quick = a.pop("no_clip"), a.pop("quick")
    cfg = Config(**a)
    if no_clip:
        cfg.max_grad_norm = None
    if quick:
        cfg.batch, cfg.seq, cfg.hidden, cfg.layers, cfg.log_every, cfg.warmup = 16, 32, 32, 4, 1, 1
        cfg.steps = 4 if cfg.steps == Config.steps else cfg.steps
    return cfg


def layouts(cfg: Config, world: int) -> list[tuple]:
    """The (dp, pp, sp, tp) layouts to run: --layouts all, or the one given by --tp/--pp/--sp/--dp."""
    if cfg.layouts == "all":
        chosen = [L for L in LAYOUTS_ALL if L[0] * L[1] * L[2] * L[3] == world]
        require(chosen, f"--layouts all runs the layouts of 2 or 4 ranks; this job has {world}")
        return chosen
    require(cfg.layouts == "", f"--layouts must be 'all' or empty, got {cfg.layouts!r}")
    model_ranks = cfg.tp * cfg.pp * cfg.sp
    dp = cfg.dp if cfg.dp is not None else world // max(model_ranks, 1)
    return [(dp, cfg.pp, cfg.sp, cfg.tp)]


def run_layout(cfg: Config, layout: tuple, corpus, world) -> dict:
    """Train one layout up to step cfg.steps; returns its summary row (complete on rank 0)."""
    dp, pp, sp, tp = layout
    mesh = mpipar.Mesh(tp=tp, pp=pp, sp=sp, dp=dp)
    gcfg = corpus.config
    schedule = cfg.schedule if pp > 1 else "-"
    chunks = cfg.chunks if pp > 1 else 1
    model = models.GPT(gcfg, mesh, chunks, sp_mode=cfg.sp_mode, dtype=getattr(torch, cfg.dtype),
                       activation_checkpointing=cfg.checkpointing, zero=cfg.zero)
    corpus.load_into(model)
    opt = models.optimizer(model, torch.optim.AdamW, lr=cfg.lr, weight_decay=cfg.weight_decay)
    tracer = Tracer(mesh)
    name = f"dp{dp}-pp{pp}-sp{sp}-tp{tp}"
    run = Run(cfg, name, cfg.layouts == "all", mesh.world.comm, UNITS,
              {"experiment": "train_gpt", "config": dataclasses.asdict(cfg)})
    start = run.start(model, opt)
    rank0 = mesh.world.rank == 0
    if rank0:
        print(f"[{name}] {gcfg.num_params() / 1e6:.2f}M parameters, schedule {schedule}, "
              f"{cfg.microbatches} microbatches, steps {start}..{cfg.steps - 1}", flush=True)
    signum = 0
    for step in range(start, cfg.steps):
        tokens, targets = corpus.batch(step, cfg.batch, cfg.seq)
        # Activations are metered on the warmup steps (and a resumed run's first): the meter's Python
        # hook per saved tensor slows a step by its own share per layout, and the timed steps are
        # what mpipar.plan predicts (bare train_steps).
        metered = step < max(cfg.warmup, 1) or step == start
        tracer.activations.enabled = metered
        tracer.activations.reset_peak()
        mesh.world.comm.Barrier()
        t0 = time.perf_counter()
        with tracer.span("train_step", microbatch=-1, step=step, layout=name), tracer.activations:
            loss = models.train_step(model, (tokens, targets), opt, mesh, cfg.microbatches, schedule,
                                     max_grad_norm=cfg.max_grad_norm, bf16=cfg.bf16, tracer=tracer)
        dt = mesh.world.comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
        mem = tracer.sample_memory(f"step {step}", step=step, layout=name)
        rss = mesh.world.comm.allreduce(mem["rss_bytes"], op=MPI.MAX)
        act = mesh.world.comm.allreduce(mem["activation_peak_bytes"], op=MPI.MAX)
        row = {"layout": name, "arch": gcfg.arch, "dp": dp, "pp": pp, "sp": sp, "tp": tp, "schedule": schedule,
               "step": step,
               "loss": loss, "step_s": dt, "tokens": cfg.batch * cfg.seq, "tokens_per_s": cfg.batch * cfg.seq / dt,
               "max_rss_bytes": rss, "max_activation_peak_bytes": act}
        run.record(row)
        if rank0 and ((step - start) % cfg.log_every == 0 or step == cfg.steps - 1):
            print(f"[{name}] step {step:4d}  loss {loss:.4f}  {row['tokens_per_s']:9.0f} tok/s  "
                  f"rss {rss / 2**20:.0f} MiB  activations "
                  + (f"{act / 2**20:.1f} MiB" if metered else "(not metered)"), flush=True)
        signum = run.after_step(model, opt, step + 1)
        if signum:
            break
    tracer.save(cfg.out, attrs={"experiment": "train_gpt", "config": dataclasses.asdict(cfg)})
    run.stop(signum)
    stats = run.summary(cfg.warmup) or dict.fromkeys(("first_loss", "last_loss", "step_s", "max_rss_bytes",
                                                      "max_activation_peak_bytes"), 0.0)
    row = {"layout": name, "arch": gcfg.arch, "dp": dp, "pp": pp, "sp": sp, "tp": tp, "schedule": schedule,
           "params": gcfg.num_params(), **stats, "tokens_per_s": cfg.batch * cfg.seq / (stats["step_s"] or float("inf"))}
    row.update(plan_runs.train_gpt_prediction(gcfg, cfg, layout, row, tracer.spans))  # predicted vs measured
    model.close()  # out of shared memory, then every window and communicator of the layout:
    mesh.close()   # else each layout of a sweep keeps the earlier ones' mapped
    return row


def main() -> None:
    install_abort_on_exception()
    cfg = parse_args()
    world = MPI.COMM_WORLD
    require(cfg.steps >= 1, "--steps must be at least 1")
    corpus = Source(cfg)
    summary = []
    for layout in layouts(cfg, world.Get_size()):
        summary.append(run_layout(cfg, layout, corpus, world))
    if world.rank == 0:
        write_table(cfg.out, "train_gpt_layouts", summary, {**UNITS, **plan_runs.UNITS})
        print(f"\n{'layout':<20}{'schedule':<18}{'tokens/s':>10}{'step s':>9}{'loss first':>12}"
              f"{'loss last':>11}{'max RSS MiB':>13}")
        for s in summary:
            print(f"{s['layout']:<20}{s['schedule']:<18}{s['tokens_per_s']:>10.0f}{s['step_s']:>9.3f}"
                  f"{s['first_loss']:>12.4f}{s['last_loss']:>11.4f}{s['max_rss_bytes'] / 2**20:>13.0f}")
        print(plan_runs.format_predicted(summary))
        print(f"results: {cfg.out}")


if __name__ == "__main__":
    main()
