"""What the study runs: the drivers, their flags, and how a driver is resumed.

`Driver` describes one experiment driver (script, output file, flags for the
full and the --quick study, time limit); `default_plan()` is the study of
`make run`. `driver_argv` keeps only the flags a driver's --help lists.
`prepare_resume` decides how a killed driver continues: with its --resume
flag, by rerunning it on the same file (drivers built on ResultsWriter skip
stored points), or, for a driver that cannot resume, after moving its partial
file aside. Used by experiments/study.py.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import re
import sys
from pathlib import Path

OUT_FLAGS = ("--out", "--output", "-o")
ALIASES = {"tensor_parallel": "tensor", "tp": "tensor", "pipeline_parallel": "pipeline", "pp": "pipeline",
           "sequence_parallel": "sequence", "sp": "sequence", "train_gpt": "gpt",
           "train_llama": "llama"}
LLAMA = {"--arch": "llama", "--model": "llama-tiny"}  # the study's Llama model (mpipar.models.PRESETS)


@dataclasses.dataclass
class Driver:
    """One experiment driver of the study and how to run it."""

    name: str
    script: str
    out: str
    args: dict = dataclasses.field(default_factory=dict)
    quick_args: dict = dataclasses.field(default_factory=dict)
    timeout_s: float = 150.0


def default_plan(np: int = 4) -> list[Driver]:
    """The default study, sized to finish within its 600 s budget on 2 cores at NP=4 (oversubscribed)."""
    gpt_layout = {"--layouts": "all"} if np == 4 else {"--tp": 2} if np % 2 == 0 else {}
    return [
        Driver("collectives", "experiments/collectives.py", "collectives.h5",
               {"--sizes": "4K:4M:4", "--iters": 5, "--warmup": 2},
               {"--sizes": "4K,64K", "--ops": "all_reduce,all_gather,reduce_scatter", "--iters": 2,
                "--warmup": 1}, 110),
        Driver("tensor", "experiments/tensor_parallel.py", "tensor_parallel.h5",
               {"--hiddens": "256,512", "--tokens": 512, "--iters": 2, "--warmup": 1},
               {"--quick": True, "--blocks": "mlp"}, 110),
        # steps of 15-50 ms, side by side with torch's: a median of 2 is one pair of samples of a
        # noisy host (4 ranks on 2 cores); 6 cost 5.5 s more (the driver took 29 s, then 34.5 s)
        Driver("pipeline", "experiments/pipeline.py", "pipeline.h5",
               {"--hidden": 128, "--batch": 32, "--layers": 8, "--microbatches": "2,8", "--steps": 6},
               {"--quick": True, "--schedules": "gpipe,1f1b"}, 110),
        Driver("sequence", "experiments/sequence_parallel.py", "sequence_parallel.h5",
               {"--seqs": "512,1024,2048", "--iters": 2, "--warmup": 1, "--no-context-parallel": True},
               {"--quick": True, "--methods": "serial,ring-zigzag,ulysses"}, 100),
        Driver("gpt", "experiments/train_gpt.py", "train_gpt.h5",
               {**gpt_layout, "--steps": 6, "--warmup": 2}, {"--quick": True, "--steps": 3}, 100),
        # ZeRO memory sweep only (~40 s at NP=4); the step-time benchmark is experiments/zero.py alone
        Driver("zero", "experiments/zero.py", "zero.h5",
               {"--sweep-only": True, "--hidden": 128, "--layers": 2, "--batch": 8},
               {"--sweep-only": True, "--quick": True}, 90),
        # gpt's layouts on the Llama family (RMSNorm, rotary, SwiGLU, GQA; 0.19M parameters), 20-60 s
        # at NP=4; last, so that a study short of time budget skips it rather than an older driver
        Driver("llama", "experiments/train_gpt.py", "train_llama.h5",
               {**gpt_layout, **LLAMA, "--steps": 4, "--warmup": 2}, {"--quick": True, **LLAMA, "--steps": 3}, 100),
    ]


def load_plan(path: str | None, np: int = 4) -> tuple[str | None, list[Driver]]:
    """(study name or None, drivers) from a JSON config, or the default plan for `np` ranks."""
    if not path:
        return None, default_plan(np)
    cfg = json.loads(Path(path).read_text())
    return cfg.get("study"), [Driver(**d) for d in cfg["drivers"]]


def select(drivers: list[Driver], only: list[str]) -> list[Driver]:
    """The drivers named in `only` (comma lists, aliases allowed), in plan order."""
    wanted = {ALIASES.get(n, n) for item in only for n in item.split(",") if n}
    unknown = wanted - {d.name for d in drivers}
    if unknown:
        sys.exit(f"study: unknown experiment(s) {sorted(unknown)}; have {[d.name for d in drivers]}")
    return [d for d in drivers if not wanted or d.name in wanted]


def utc_stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def driver_argv(d: Driver, quick: bool, help_text: str, out: Path, extra: dict) -> tuple[list[str], list[str]]:
    """(argv after `python`, flags dropped because the driver's --help does not list them)."""
    flags = {**(d.quick_args if quick else d.args), **extra}
    known = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", help_text)) if help_text else None
    argv, dropped = [d.script], []
    out_flag = next((f for f in OUT_FLAGS if known is None or f in known), None)
    if out_flag:
        argv += [out_flag, str(out)]
    for flag, value in flags.items():
        if value is None or value is False:
            continue
        if known is not None and flag not in known:
            dropped.append(flag)
            continue
        argv += [flag] if value is True else [flag, *map(str, value if isinstance(value, list) else [value])]
    return argv, dropped


def count_points(path: Path) -> int | None:
    """Points of an HDF5 file: rows of its sweep tables (those with a point_key), else of all
    its /results tables; None if the file is missing or unreadable."""
    try:
        import h5py

        with h5py.File(path, "r") as f:
            tables = list(f.get("results", {}).values())
            keyed = [g for g in tables if "point_key" in g] or tables  # sweeps, else whole tables
            return sum(int(g.attrs.get("nrows", 0)) for g in keyed)
    except Exception:
        return None


def resumable(source: str) -> bool:
    """Does the driver skip the points already in its --out file (ResultsWriter.done / completed_points)?"""
    return bool(re.search(r"completed_points\(|\.done\(", source))


def prepare_resume(out: Path, source: str, entry: dict) -> None:
    """Before rerunning a driver into `out`: move a partial `out` aside unless the driver resumes.

    A driver built on ResultsWriter skips the points already stored, so it
    simply runs again on the same file; any other driver starts afresh (its
    partial file is kept as <name>.h5.partial-<UTC> and listed in the entry).
    """
    if not out.exists() or resumable(source):
        return
    aside = out.with_name(f"{out.name}.partial-{utc_stamp()}")  # not *.h5: the analysis skips it
    out.rename(aside)
    entry.setdefault("moved_aside", []).append(aside.name)
