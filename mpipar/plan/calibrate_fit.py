"""Fit the plan's model to a host's steps (used by mpipar.plan.calibrate, which measures them).

The micro-benchmarks give each cost's shape; these fits give the scales that only real
steps show: per arch, the per-op overhead and FLOP time of eager training (fit_compute,
from one rank's steps at two micro-batch sizes), then the host's contention, the cost
of a collective called right after compute, the share of compute a smaller group loses
waiting and what a waiting pipeline rank costs (fit_training, from steps of a small GPT
on the layouts of 2 and 4 ranks). Each searches the model's own prediction of the probe
(mpipar.plan.estimate), so the fitted numbers mean what the model means by them.
"""
from __future__ import annotations

import copy

import numpy as np

from .spec import Layout, ModelSpec
from .system import System


def _solve(f, target: float, lo: float, hi: float) -> float:
    """x in [lo, hi] with f(x) = target for an increasing f (the nearer bound when out of reach)."""
    if f(lo) >= target:
        return lo
    if f(hi) <= target:
        return hi
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return (lo + hi) / 2


def _probe_step(data: dict, name: str, n: int) -> float:
    from .calibrate_comm import PROBE_MICRO_BATCH, PROBE_MICROBATCHES, PROBE_MODEL, probe_layouts
    from .estimate import estimate

    sizes = probe_layouts(n)[name]
    dp = sizes.get("dp", 1)
    m = PROBE_MICROBATCHES
    cfg = dict(PROBE_MODEL)
    spec = ModelSpec(cfg.pop("vocab_size"), cfg.pop("seq_len"), cfg.pop("hidden"), cfg.pop("num_heads"),
                     cfg.pop("num_layers"))
    layout = Layout(**sizes, micro_batch=PROBE_MICRO_BATCH, global_batch=m * PROBE_MICRO_BATCH * dp, sequence_parallel=sizes.get("tp", 1) > 1,
                    dtype="fp32")
    return estimate(spec, System(data), layout).step_time


def _serial_step(data: dict, key: str) -> float:
    """The model's step of calibrate_comm.serial_steps' run `key` ("ARCH@B") on `data`."""
    return _serial_parts(data, key)[0]


def _serial_parts(data: dict, key: str) -> tuple[float, float]:
    """(the model's step of serial run `key` on `data`, the device-work share of its compute)."""
    from .calibrate_comm import PROBE_MICROBATCHES, SERIAL_MODELS
    from .estimate import estimate

    arch, _, b = key.rpartition("@")
    cfg = SERIAL_MODELS[arch]
    spec = ModelSpec(cfg["vocab_size"], cfg["seq_len"], cfg["hidden"], cfg["num_heads"], cfg["num_layers"],
                     ffn_hidden=cfg.get("ffn_hidden"), arch=arch, num_kv_heads=cfg.get("num_kv_heads"))
    layout = Layout(micro_batch=int(b), global_batch=PROBE_MICROBATCHES * int(b), dtype="fp32")
    est = estimate(spec, System(data), layout)
    return est.step_time, est.details["critical"].work_share


def _ends_by_arch(keys) -> dict:
    """{arch: (key of its smallest micro-batch, key of its largest)} of the "ARCH@B" keys with two sizes or more."""
    by_arch: dict = {}
    for key in keys:
        arch, _, b = key.rpartition("@")
        by_arch.setdefault(arch, []).append(int(b))
    return {arch: (f"{arch}@{min(sizes)}", f"{arch}@{max(sizes)}") for arch, sizes in sorted(by_arch.items())
            if len(sizes) >= 2}


def _with_scale(data: dict, arch: str, overhead: float, flops: float) -> dict:
    d = copy.deepcopy(data)
    d.setdefault("compute_scale", {})[arch] = {"op_overhead": overhead, "flops": flops}
    return d


def fit_compute(data: dict, serial_s: dict, log=print) -> dict:
    """compute_scale[arch] (System.for_arch) such that the model reproduces each arch's serial
    steps at its smallest and largest micro-batch (calibrate_comm.serial_steps, keys "ARCH@B").

    Why: the overhead is timed on a tiny block in cache and the FLOP rate on bare GEMMs; eager
    training costs a different mix of the two, in proportions that depend on the block's ops.
    Unscaled, the model's error moved with the micro-batch a rank runs at (docs/plan.md), and
    layouts of one model, which run at different micro-batches per rank, were ranked by it. A
    step is linear in the two scales (the overhead adds to each op, the FLOPs divide by the
    rate), so two sizes fix both."""
    data = copy.deepcopy(data)
    data.setdefault("measurements", {})["serial_s"] = dict(serial_s)
    for arch, keys in _ends_by_arch(serial_s).items():
        rows, rhs = [], []
        for key in keys:
            t11 = _serial_step(_with_scale(data, arch, 1.0, 1.0), key)
            per_overhead = _serial_step(_with_scale(data, arch, 2.0, 1.0), key) - t11
            per_flops = _serial_step(_with_scale(data, arch, 1.0, 2.0), key) - t11
            rows.append([per_overhead, per_flops])
            rhs.append(serial_s[key] - (t11 - per_overhead - per_flops))
        try:
            k_o, k_f = (float(x) for x in np.linalg.solve(np.array(rows), np.array(rhs)))
        except np.linalg.LinAlgError:
            continue
        # noise can push a solution out of any real host's reach: keep it within 8x of the probes
        k_o, k_f = min(max(k_o, 0.125), 8.0), min(max(k_f, 0.125), 8.0)
        unscaled = [_serial_step(_with_scale(data, arch, 1.0, 1.0), key) for key in keys]
        data = _with_scale(data, arch, k_o, k_f)
        for key, before in zip(keys, unscaled):
            log(f"serial probe {key}: measured {serial_s[key] * 1e3:.1f} ms, model {before * 1e3:.1f} ms "
                f"unscaled, {_serial_step(data, key) * 1e3:.1f} ms scaled")
        log(f"fitted for {arch}: per-op overhead x{k_o:.2f}, FLOP time x{k_f:.2f} of the micro-benchmarks'")
    return data


def fit_contention_split(data: dict, busy_s: dict, log=print) -> dict:
    """contention_split[arch][N] = [overhead, work]: how much slower the per-op overhead and the
    device work of that arch's serial model run with N ranks busy (busy_s[N]["ARCH@B"]: every rank
    stepping its own model at once), against the serial steps alone (measurements.serial_s).

    Why: the host's cores are time-shared by both, and device work also shares the caches and
    memory bandwidth, so it slows more; a rank at micro-batch 1 is mostly overhead, at 8 mostly
    work. One factor per N, fitted to one model at one micro-batch, charged its own mix to every
    model and size (docs/plan.md). Each step's slowdown is overhead + (work - overhead) x its
    work share (the model's), so the two micro-batch sizes fix both."""
    data = copy.deepcopy(data)
    alone = data.get("measurements", {}).get("serial_s", {})
    split: dict = {}
    for n, steps in sorted(busy_s.items(), key=lambda kv: int(kv[0])):
        for arch, keys in _ends_by_arch(k for k in steps if k in alone).items():
            rows, rhs = [], []
            for key in keys:
                _, share = _serial_parts(data, key)
                rows.append([1.0 - share, share])
                rhs.append(steps[key] / alone[key])
            try:
                o, w = (float(x) for x in np.linalg.solve(np.array(rows), np.array(rhs)))
            except np.linalg.LinAlgError:
                continue
            o, w = min(max(o, 1.0), 50.0), min(max(w, 1.0), 50.0)   # noise: within what a host can do
            split.setdefault(arch, {})[str(n)] = [o, w]
            log(f"{arch} with {n} ranks busy: " + ", ".join(
                f"@{k.rpartition('@')[2]} {steps[k] / alone[k]:.2f}x" for k in keys)
                + f" slower; per-op overhead x{o:.2f}, device work x{w:.2f}")
    archs = set(_ends_by_arch(alone))
    if split and all(set(split.get(a, {})) == set(busy_s) for a in archs):
        # every arch split at every N (contention then means the split's scale for all of them)
        data["contention_split"] = split
        data.setdefault("measurements", {})["busy_serial_s"] = busy_s
        # contention now scales the split: 1 until fit_training fits it to the training probes
        data["contention"] = {n: 1.0 for n in data.get("contention", {})}
    return data


def young_wait_s() -> float:
    """How long a polite wait stays young: until its sleep, which grows as a share of the time
    waited, reaches its longest (mpipar.comm.wait.POLITE: longest_sleep / share)."""
    from ..comm.wait import POLITE

    return POLITE.longest_sleep / POLITE.share


def fit_training(data: dict, train_s: dict, log=print) -> dict:
    """Fit the host's effective contention (from the dp probes), the per-call cost of a
    collective called right after compute (`sync_after_compute`, from the tp probes) and the
    share of compute a pair loses waiting while other pairs hold the cores (`sync_share`,
    from tp2 x dp2 at 4 ranks) and what a waiting rank costs the computing ones (`idle_share`,
    from the pipeline of the most ranks, when they outnumber the cores) so the model
    reproduces those training probes' steps; the other pp and the sp probes are left as a
    check.

    Why: on a host with more ranks than cores, a rank arriving first at a collective waits
    until its peers are scheduled again, and ranks share caches; neither the collective loops
    (every rank already waiting) nor the compute probe (alone in cache) see that."""
    data = copy.deepcopy(data)
    data.setdefault("sync_after_compute", {})
    data.setdefault("sync_share", {})
    sizes = sorted({int(k.rpartition("@")[2]) for k in train_s})
    for _ in range(6):                      # dp's all-reduce feels the sync floor too: iterate
        for n in sizes:
            def with_contention(c, n=n):
                data["contention"][str(n)] = c
                return _probe_step(data, "dp", n)
            # with contention_split measured, contention only scales it (and may be below 1)
            _solve(with_contention, train_s[f"dp@{n}"], 0.25 if data.get("contention_split") else 1.0, 50.0)
            for name, field, key, hi in (("tp", "sync_after_compute", str(n), 0.05),
                                         ("tp2dp2", "sync_share", "2@4", 10.0)):
                if f"{name}@{n}" not in train_s:
                    continue

                def with_sync(x, field=field, key=key, name=name, n=n):
                    data[field][key] = x
                    return _probe_step(data, name, n)
                _solve(with_sync, train_s[f"{name}@{n}"], 0.0, hi)
    n = max(sizes)
    if f"pp@{n}" in train_s and n > (data.get("cores") or n):
        data["idle_young_s"] = young_wait_s()

        def with_idle(x, n=n):
            data["idle_share"] = x
            return _probe_step(data, "pp", n)
        _solve(with_idle, train_s[f"pp@{n}"], 0.0, 2.0)
    for k, measured in sorted(train_s.items()):
        name, _, n = k.rpartition("@")
        pred = _probe_step(data, name, int(n))
        log(f"training probe {k}: measured {measured * 1e3:.1f} ms, model {pred * 1e3:.1f} ms "
            f"({pred / measured - 1:+.0%})")
    log("fitted: contention " + ", ".join(f"{n}: {c:.2f}x" for n, c in data["contention"].items())
        + (" of the split" if data.get("contention_split") else "")
        + "; a collective after compute costs at least "
        + ", ".join(f"{k}: {s * 1e6:.0f} us" for k, s in data["sync_after_compute"].items())
        + "; a smaller group waits " + ", ".join(f"{k}: {f:.2f}" for k, f in data["sync_share"].items())
        + " of its compute"
        + (f"; a waiting rank costs the host {data['idle_share']:.2f} of a computing one for the first "
           f"{data.get('idle_young_s', float('inf')) * 1e3:.0f} ms of its wait" if "idle_share" in data else ""))
    return data
