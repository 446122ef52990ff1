#!/usr/bin/env python3
"""What mpipar's tagged point-to-point (mpipar.comm.channel) costs per message pair, beside raw mpi4py.

    mpiexec -n 2 python experiments/p2p_channel.py [--quick] [--rounds 30] [--iters 100] [--repeats 10]
        [--bytes 4096] [--out F.h5]
    python experiments/p2p_channel.py ...      (one rank: it exchanges with itself)

Ranks 0 and 1 (or one rank with itself) exchange --bytes of float32 in a tight loop:
each posts a receive from the other, a send to it, and waits for both. Ways:
- `mpi4py`: Irecv + Isend on numpy arrays, Waitall (the peer a user would pick);
- `comm.isend/irecv`: mpipar's public calls on tensors, each Request waited
  (argument checks, size check of the receive, flight recorder);
- `channel.post`: Channel.post_recv / post_send + Channel.wait (the ring collectives'
  hot path: raw requests);
- `channel.send/recv`: Channel.recv / send (Pendings: staging when needed) + a
  recorded Channel.wait (ring attention's K/V ring).
The ways are interleaved (round k starts with the k-th), so a slow phase of a shared
machine hits all alike. A round times --repeats batches of --iters exchanges per way
and keeps the fastest batch (the cost without a lost core); the table gives the median
over --rounds of that wall and process CPU time per exchange (rank 0), and the excess
over mpi4py's. One rank is the clean measure of the CPU a call costs (no peer to wait
for); two add the ranks' scheduling. Extra ranks wait. Writes /results/p2p_channel
to results/p2p_channel/<UTC stamp>.h5 (or --out); prints a table on rank 0.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from mpi4py import MPI

import mpipar
from mpipar import comm, trace
from mpipar.comm.channel import Channel
from mpipar.mesh import Group

from _common import write_results

UNITS = {k: "s" for k in ("wall_s", "cpu_s", "wall_over_mpi4py_s", "cpu_over_mpi4py_s")} | {"bytes": "B"}


def ways(g, nbytes: int) -> dict:
    """name -> one exchange with the peer of group g (rank 1 - rank; itself on one rank)."""
    peer, n = (g.size - 1) - g.rank, nbytes // 4
    a, b = np.ones(n, np.float32), np.empty(n, np.float32)
    x, y = torch.ones(n), torch.empty(n)
    raw = g.comm
    ch, recorded = Channel(g.p2p), Channel(g.p2p, g)

    def mpi4py():
        MPI.Request.Waitall([raw.Irecv(b, source=peer, tag=5), raw.Isend(a, dest=peer, tag=5)])

    def public():
        r, s = comm.irecv(y, peer, g, tag=5), comm.isend(x, peer, g, tag=5)
        r.wait()
        s.wait()

    def post():
        ch.wait([ch.post_recv(y, peer, 5), ch.post_send(x, peer, 5)])

    def pending():
        recorded.wait([recorded.recv(y, peer, 5), recorded.send(x, peer, 5)], "exchange", peer)

    return {"mpi4py": mpi4py, "comm.isend/irecv": public, "channel.post": post, "channel.send/recv": pending}


def timed(run, iters: int, repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds per call of the fastest of `repeats` batches of `iters` back-to-back calls."""
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        for _ in range(iters):
            run()
        best = min(best, ((time.perf_counter() - w) / iters, (time.process_time() - c) / iters))
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--bytes", type=int, default=4096)
    p.add_argument("--quick", action="store_true", help="3 rounds of 2 batches of 50")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.iters, a.repeats = 3, 50, 2
    torch.set_num_threads(1)
    mesh = mpipar.Mesh(comm=MPI.COMM_WORLD)
    ranks = min(2, mesh.world.size)
    pair = mesh.world.comm.Split(0 if mesh.world.rank < ranks else MPI.UNDEFINED, mesh.world.rank)
    samples: dict = {}
    if pair != MPI.COMM_NULL:
        g = Group(pair, "pair")
        runs = ways(g, a.bytes)
        names = list(runs)
        for run in runs.values():  # warm up
            timed(run, 20, 1)
        for k in range(a.rounds):
            for j in range(len(names)):
                name = names[(j + k) % len(names)]
                pair.Barrier()
                samples.setdefault(name, []).append(timed(runs[name], a.iters, a.repeats))
    prov = trace.provenance(mesh)  # collective
    if mesh.world.rank == 0:
        med = {n: np.median(np.array(v), axis=0) for n, v in samples.items()}
        base = med["mpi4py"]
        rows = [{"way": n, "ranks": ranks, "bytes": a.bytes, "rounds": a.rounds, "iters": a.iters,
                 "repeats": a.repeats, "oversubscribed": bool(mesh.world.oversubscribed),
                 "wall_s": float(m[0]), "cpu_s": float(m[1]),
                 "wall_over_mpi4py_s": float(m[0] - base[0]), "cpu_over_mpi4py_s": float(m[1] - base[1])}
                for n, m in med.items()]
        print(f"{a.bytes} B exchange (irecv + isend + wait both), {ranks} rank(s), medians over {a.rounds} "
              f"interleaved rounds of the fastest of {a.repeats} batches of {a.iters}")
        print(f"{'way':>18} | {'wall us':>8} {'over':>6} | {'cpu us':>8} {'over':>6}")
        for r in rows:
            print(f"{r['way']:>18} | {r['wall_s'] * 1e6:8.2f} {r['wall_over_mpi4py_s'] * 1e6:+6.2f} | "
                  f"{r['cpu_s'] * 1e6:8.2f} {r['cpu_over_mpi4py_s'] * 1e6:+6.2f}")
        write_results(a.out, "p2p_channel", rows, UNITS, prov)
    return 0


if __name__ == "__main__":
    sys.exit(main())
