"""`python -m mpipar.plan search|estimate|calibrate|validate`.

    python -m mpipar.plan estimate --model gpt2-xl --system a100-80gb --tp 2 --pp 2 --dp 16 --batch 512 --explain
    python -m mpipar.plan search --model llama3-8b --system h100-80gb --world 64 --batch 512 --top 10
    python -m mpipar.plan calibrate [-o my-machine.json] [--quick]   # kept as this host's system "local"
    python -m mpipar.plan validate          # Narayanan et al. 2021 Table 1, predicted next to published

--model takes a preset (see --help) or explicit --vocab --seq --hidden --heads --layers [--ffn --arch --kv-heads].
"""
from __future__ import annotations

import argparse
import sys

from ..errors import MpiparError

PRESETS = {
    "train-gpt": dict(vocab_size=64, seq_len=64, hidden=144, num_heads=4, num_layers=4),
    "gpt2-small": dict(vocab_size=50257, seq_len=1024, hidden=768, num_heads=12, num_layers=12, tied=True),
    "gpt2-xl": dict(vocab_size=50257, seq_len=1024, hidden=1600, num_heads=25, num_layers=48, tied=True),
    "gpt3-175b": dict(vocab_size=51200, seq_len=2048, hidden=12288, num_heads=96, num_layers=96, tied=True),
    "llama2-7b": dict(vocab_size=32000, seq_len=4096, hidden=4096, num_heads=32, num_layers=32, ffn_hidden=11008,
                      arch="llama"),
    "llama3-8b": dict(vocab_size=128256, seq_len=8192, hidden=4096, num_heads=32, num_layers=32,
                      ffn_hidden=14336, arch="llama", num_kv_heads=8),
    "llama3-70b": dict(vocab_size=128256, seq_len=8192, hidden=8192, num_heads=64, num_layers=80,
                       ffn_hidden=28672, arch="llama", num_kv_heads=8),
}


def _spec(args):
    from .spec import ModelSpec

    if args.model:
        if args.model not in PRESETS:
            raise MpiparError(f"unknown --model {args.model!r}; presets: {sorted(PRESETS)}")
        kw = dict(PRESETS[args.model])
    else:
        kw = {}
    for flag, name in (("vocab", "vocab_size"), ("seq", "seq_len"), ("hidden", "hidden"), ("heads", "num_heads"),
                       ("layers", "num_layers"), ("ffn", "ffn_hidden"), ("arch", "arch"), ("kv_heads", "num_kv_heads")):
        if getattr(args, flag) is not None:
            kw[name] = getattr(args, flag)
    missing = [k for k in ("vocab_size", "seq_len", "hidden", "num_heads", "num_layers") if k not in kw]
    if missing:
        raise MpiparError(f"give --model or all of --vocab --seq --hidden --heads --layers (missing {missing})")
    return ModelSpec(**kw)


def _table(ests, top: int) -> str:
    cols = ("compute", "tp_comm", "sp_comm", "pp_comm", "dp_comm", "bubble", "optimizer")
    head = f"{'#':>3} {'layout':<52}{'step ms':>10}{'tok/s':>11}{'MFU':>7}{'mem GiB':>9}  " + \
        " ".join(f"{c:>9}" for c in cols)
    lines = [head]
    for i, e in enumerate(ests[:top]):
        lines.append(f"{i + 1:>3} {e.layout.name():<52}{e.step_time * 1e3:>10.2f}{e.tokens_per_s:>11,.0f}"
                     f"{e.mfu:>7.1%}{(e.memory + e.runtime_memory) / 2**30:>9.2f}  "
                     + " ".join(f"{e.breakdown[c] * 1e3:>9.2f}" for c in cols))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpipar.plan", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("estimate", "search"):
        s = sub.add_parser(name)
        s.add_argument("--model", help=f"preset: {', '.join(sorted(PRESETS))}")
        for flag in ("vocab", "seq", "hidden", "heads", "layers", "ffn", "kv-heads"):
            s.add_argument(f"--{flag}", type=int)
        s.add_argument("--arch", choices=("gpt2", "llama"))
        s.add_argument("--system", default="a100-80gb", help="shipped name or JSON file")
        s.add_argument("--batch", type=int, required=True, help="global batch (sequences)")
        s.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"))
        s.add_argument("--explain", action="store_true", help="the per-component reasoning")
    e = sub.choices["estimate"]
    for flag in ("tp", "pp", "dp", "sp", "chunks", "micro-batch", "zero"):
        e.add_argument(f"--{flag}", type=int, default=0 if flag == "zero" else 1)
    e.add_argument("--schedule", default="1f1b")
    e.add_argument("--sp-mode", default="ring")
    e.add_argument("--recompute", default="none")
    e.add_argument("--sequence-parallel", action="store_true")
    s = sub.choices["search"]
    s.add_argument("--world", type=int, required=True)
    s.add_argument("--memory-limit", type=float, help="GiB per rank (default: the system's)")
    s.add_argument("--top", type=int, default=15)
    c = sub.add_parser("calibrate")
    c.add_argument("-o", "--out", help="also write the system to this JSON file")
    c.add_argument("--no-keep", action="store_true",
                   help="do not keep it as this host's calibration (the system \"local\")")
    c.add_argument("--ranks", default="2,4", help="comma-separated MPI group sizes to measure ('' for none)")
    c.add_argument("--quick", action="store_true")
    c.add_argument("--threads", type=int, default=1)
    v = sub.add_parser("validate")
    v.add_argument("--system", default="a100-80gb")
    args = p.parse_args(argv)
    try:
        return _run(args)
    except MpiparError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from .estimate import estimate
    from .search import search
    from .spec import Layout
    from .system import System

    if args.cmd == "calibrate":
        from .calibrate import calibrate

        ranks = tuple(int(x) for x in args.ranks.split(",") if x)
        if args.no_keep and not args.out:
            raise MpiparError("calibrate: --no-keep without -o would throw the measurement away")
        calibrate(args.out, ranks=ranks, quick=args.quick, threads=args.threads, keep=not args.no_keep)
        return 0
    if args.cmd == "validate":
        from .check import format_table, narayanan_table

        print("Narayanan et al. 2021, Table 1 (teraFLOP/s per GPU), system", args.system)
        print(format_table(narayanan_table(args.system)))
        return 0
    spec, system = _spec(args), System.load(args.system)
    if args.cmd == "estimate":
        layout = Layout(tp=args.tp, pp=args.pp, dp=args.dp, sp=args.sp, sp_mode=args.sp_mode,
                        num_chunks=args.chunks, schedule=args.schedule, micro_batch=args.micro_batch,
                        global_batch=args.batch, sequence_parallel=args.sequence_parallel,
                        recompute=args.recompute, zero=args.zero, dtype=args.dtype)
        est = estimate(spec, system, layout)
        print(_table([est], 1))
        if args.explain:
            print(est.explain())
        return 0
    limit = args.memory_limit * 2**30 if args.memory_limit else None
    stats: dict = {}
    ests = search(spec, system, args.world, args.batch, limit, stats=stats, dtype=args.dtype)
    print(f"{stats['tried']} layouts in {stats['seconds']:.2f} s ({stats['layouts_per_s']:,.0f}/s, "
          f"{stats['layouts_per_cpu_s']:,.0f} per CPU second): {stats['kept']} fit, {stats['too_big']} too big, "
          f"{stats['invalid']} cannot split the model")
    if not ests:
        print("no layout fits")
        return 1
    print(_table(ests, args.top))
    if args.explain:
        print()
        print(ests[0].explain())
    return 0


if __name__ == "__main__":
    sys.exit(main())
