#!/usr/bin/env python3
"""The peer of `train_gpt.py --model PRESET`: transformers' LlamaForCausalLM under torch DDP (gloo).

    mpiexec -n 4 python experiments/train_gpt.py --model llama-tiny --data tokens.bin --layouts all \
        --out results/llama.h5
    mpiexec -n 4 python experiments/llama_peer.py --model llama-tiny --data tokens.bin --out results/llama.h5

Same model (mpipar's initial weights, converted with models.to_hf), data
(--data, or train_gpt.py's default built-in corpus),
global batch, microbatches (gradient accumulation with no_sync) and AdamW as
train_gpt.py at dp = world size. Writes /results/llama_peer (one row: median
step time and tokens/s after the warm-up steps, losses) into --out and prints it.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from mpi4py import MPI

from _common import init_gloo
from mpipar import models
from mpipar.flight.abort import install_abort_on_exception
from mpipar.trace import write_table


def main() -> None:
    install_abort_on_exception()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-tiny")
    p.add_argument("--data", default="", help="token file (default: the built-in character corpus)")
    p.add_argument("--data-dtype", default="uint16")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / ranks)")
    p.add_argument("--out", default="results/llama_peer.h5")
    p.add_argument("--quick", action="store_true", help="2 steps of batch 8, seq 32 (smoke test)")
    a = p.parse_args()
    if a.quick:
        a.steps, a.warmup, a.batch, a.seq, a.microbatches = 2, 0, 8, 32, 2
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    import transformers

    world = MPI.COMM_WORLD
    rank, n = world.Get_rank(), world.Get_size()
    from _common import setup_threads
    from mpipar import Mesh

    mesh = Mesh(dp=n)
    threads = setup_threads(world, a.threads)
    init_gloo(mesh.dp)
    if a.data:
        data = models.TokenFile(a.data, a.data_dtype)
        vocab = -(-(data.max_id() + 1) // 64) * 64
    else:
        data = models.CharCorpus(num_chars=200_000, seed=a.seed)
        vocab = data.vocab_size
    cfg = models.preset(a.model, vocab_size=vocab, seq_len=a.seq, seed=a.seed)
    hf = transformers.LlamaForCausalLM(models.to_hf_config(cfg))
    hf.load_state_dict(models.to_hf(cfg, models.GPT(cfg).full_state_dict()), strict=False)
    model = DDP(hf)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.1)
    times, losses = [], []
    for step in range(a.steps):
        tokens, targets = (data.batch(step, a.batch, a.seq, seed=a.seed) if a.data
                           else data.batch(step, a.batch, a.seq))
        x, y = tokens.tensor_split(n)[rank], targets.tensor_split(n)[rank]
        world.Barrier()
        t0 = time.perf_counter()
        total = 0.0
        parts = list(zip(x.tensor_split(a.microbatches), y.tensor_split(a.microbatches)))
        for i, (xm, ym) in enumerate(parts):
            ctx = model.no_sync() if i < len(parts) - 1 else torch.enable_grad()
            with ctx:
                loss = F.cross_entropy(model(xm).logits.flatten(0, 1), ym.reshape(-1))
                (loss / len(parts)).backward()
            total += float(loss.detach()) / len(parts)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        times.append(world.allreduce(time.perf_counter() - t0, op=MPI.MAX))
        losses.append(world.allreduce(total, op=MPI.SUM) / n)
    timed = times[a.warmup:] or times
    row = {"peer": "transformers LlamaForCausalLM + torch DDP (gloo)", "model": a.model, "dp": n,
           "params": cfg.num_params(), "threads": threads, "first_loss": losses[0], "last_loss": losses[-1],
           "step_s": statistics.median(timed), "tokens_per_s": a.batch * a.seq / statistics.median(timed)}
    if rank == 0:
        write_table(a.out, "llama_peer", [row], {"step_s": "s", "tokens_per_s": "tokens/s", "first_loss": "nats",
                                                 "last_loss": "nats"})
        print(f"{row['peer']}: dp={n}  {row['tokens_per_s']:.0f} tokens/s  step {row['step_s']:.3f} s  "
              f"loss {row['first_loss']:.4f} -> {row['last_loss']:.4f}\nresults: {a.out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
