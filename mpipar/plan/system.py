"""System: what a machine can do, read from a JSON file (shipped in systems/ or written by calibrate).

Fields (every shipped number carries its source under "sources"):
  peak_flops{dtype}            dense matmul peak per device, FLOP/s
  matmul{efficiency, half_dim} achieved fraction of peak for a large GEMM, and the
                               size at which each of m, n, k halves it: efficiency
                               * m/(m+d) * n/(n+d) * k/(k+d)
  attention{efficiency, half_dim}  the same for a fused (flash) attention kernel, over head_dim
  memory_bandwidth, memory_efficiency, memory_capacity (bytes/s, fraction, bytes)
  op_overhead, overhead_mode   seconds per kernel launch / eager op (op_overhead_backward, if
                               given, for backward ops); "max" (asynchronous
                               launches hide behind work) or "add" (the host waits)
  compute_scale{arch: {op_overhead, flops}}  optional (calibrate): for a model of that arch, the
                               per-op overheads times op_overhead and FLOP times times flops
                               (see for_arch)
  cores                        host cores shared by the ranks of a node (CPU systems), else null
  contention{N: factor}        measured compute slowdown with N ranks busy on the host (calibrate);
                               without it, N / cores beyond the cores
  contention_split{arch: {N: [overhead, work]}}  optional (calibrate): how much slower a model of
                               that arch runs its per-op overhead and its device work with N ranks
                               busy (each rank its own serial model); contention then scales it
  load                         optional: how much slower the host runs now than when calibrated
                               (compute and collectives; see with_load)
  ranks_per_node               devices per node
  links{intra, inter}          alpha (s per ring step), bandwidth (bus bandwidth, B/s), p2p_alpha,
                               p2p_bandwidth; inter: bandwidth per device (its NIC)
  collectives{op: {key: [a, b]}}  optional per-call fits (calibrate): time = a + nbytes * b for one
                               call of `op` on a group of N ranks of one node, key "N", or "N@H"
                               when H ranks were busy on the node; replace the intra link
  sync_after_compute{key: s}   optional (calibrate): seconds a collective of a group spanning the
                               busy ranks of the host costs at least when called right after
                               compute (key "N"); the per-call floor of a fitted collective's a
  sync_share{key: f}           optional (calibrate): for a group smaller than the busy ranks of
                               the host (key "N@H"), the fraction of its compute between
                               collectives its ranks lose waiting for a peer to be scheduled
  idle_share                   optional (calibrate): what a rank waiting in a pipeline costs the
                               host's computing ranks, as a fraction of one computing rank
                               (mpipar.plan.shared_host)
  idle_young_s                 optional (calibrate): idle_share is charged for the first this many
                               seconds of each wait (the polite backoff's short sleeps); absent:
                               the whole wait
  optimizer{bytes_per_param, per_tensor}  memory traffic of one Adam update, host overhead per tensor
  runtime_bytes                memory the framework holds before the model (context, allocator)
  software{attention, dp_overlap, ring_overlap, bucket_bytes, grad_reduce_bytes}
                               what the training code does: "flash" or "unfused" attention,
                               fraction of the last backward that hides data-parallel
                               communication, bucket size, bytes per reduced gradient element,
                               whether p2p sends 1/tp of an activation (Megatron's scatter-gather),
                               memory traffic per parameter per microbatch to accumulate gradients
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from ..errors import MpiparError
from .alpha_beta import cost as ring_cost

SYSTEMS_DIR = Path(__file__).resolve().parent / "systems"
REQUIRED = ("name", "peak_flops", "matmul", "attention", "memory_bandwidth", "memory_efficiency",
            "memory_capacity", "op_overhead", "overhead_mode", "ranks_per_node", "links", "optimizer",
            "runtime_bytes", "software")
SOFTWARE_DEFAULTS = {"attention": "flash", "dp_overlap": 1.0, "ring_overlap": 1.0,
                     "bucket_bytes": 25 * 2**20, "grad_reduce_bytes": 4,
                     "p2p_scatter_gather": False, "grad_accumulation_bytes": 0.0}


def _interpolate(pts: list, x: float) -> tuple:
    """The values of a table [(n, v1, v2, ...)] starting at n = 1, linear between its points, at x
    (1 or less: the first row's; past the last: proportional to x)."""
    if x <= pts[0][0]:
        return pts[0][1:]
    for a, b in zip(pts, pts[1:]):
        if x <= b[0]:
            u = (x - a[0]) / (b[0] - a[0])
            return tuple(va + (vb - va) * u for va, vb in zip(a[1:], b[1:]))
    return tuple(v * x / pts[-1][0] for v in pts[-1][1:])


class System:
    """A machine description; attribute access to the JSON fields, plus the cost helpers the model uses."""

    def __init__(self, data: dict, path: str | None = None):
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise MpiparError(f"System {data.get('name', path)!r}: missing fields {missing}")
        if data["overhead_mode"] not in ("max", "add"):
            raise MpiparError(f"System: overhead_mode must be 'max' or 'add', got {data['overhead_mode']!r}")
        for level in ("intra", "inter"):
            if level not in data["links"]:
                raise MpiparError(f"System {data['name']!r}: links needs {level!r}")
        self.data = copy.deepcopy(data)
        self.data["software"] = {**SOFTWARE_DEFAULTS, **data["software"]}
        self.path = path
        d = self.data
        self.name = d["name"]
        self.peak_flops = {k: float(v) for k, v in d["peak_flops"].items()}
        self.bandwidth = float(d["memory_bandwidth"]) * float(d["memory_efficiency"])
        self.capacity = float(d["memory_capacity"])
        self.op_overhead = float(d["op_overhead"])
        self.op_overhead_b = float(d.get("op_overhead_backward", d["op_overhead"]))
        self.add_overhead = d["overhead_mode"] == "add"
        self.cores = d.get("cores")
        self.ranks_per_node = int(d["ranks_per_node"])
        self.software = d["software"]
        self._memo: dict = {}
        self.collectives = {}
        for op, fits in d.get("collectives", {}).items():
            for key, ab in fits.items():
                size, _, host = str(key).partition("@")
                self.collectives[(op, int(size), int(host or size))] = (float(ab[0]), float(ab[1]))
        self.sync = {}
        for key, sec in d.get("sync_after_compute", {}).items():
            size, _, host = str(key).partition("@")
            self.sync[(int(size), int(host or size))] = float(sec)
        self.compute_scale = {arch: (float(k.get("op_overhead", 1.0)), float(k.get("flops", 1.0)))
                              for arch, k in d.get("compute_scale", {}).items()}
        self.contention_split = d.get("contention_split", {})
        # the arch's table once for_arch picked it: (N, overhead, work) from 1 rank up
        self._mix = [(1, 1.0, 1.0)] + sorted((int(n), float(o), float(w)) for n, (o, w)
                                             in d.get("contention_mix", {}).items() if int(n) > 1)
        self._table = [(1, 1.0)] + sorted((int(n), float(f)) for n, f in d.get("contention", {}).items()
                                          if int(n) > 1)
        self.shares = {}
        for key, frac in d.get("sync_share", {}).items():
            size, _, host = str(key).partition("@")
            self.shares[(int(size), int(host or size))] = float(frac)

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, name_or_path) -> "System":
        """A shipped system by name ("a100-80gb", "h100-80gb", "local-cpu"), "local" (this host's
        own calibration: mpipar.plan.host), or a JSON file path."""
        path = Path(str(name_or_path))
        if str(name_or_path) == "local":
            from . import host

            path = host.cache_path()
            if not path.exists():
                raise MpiparError("System.load: this host has no calibration yet (run `python -m mpipar.plan "
                                  f"calibrate`; it is kept in {path})")
        elif not path.suffix and not path.exists():
            path = SYSTEMS_DIR / f"{name_or_path}.json"
        if not path.exists():
            shipped = sorted(p.stem for p in SYSTEMS_DIR.glob("*.json"))
            raise MpiparError(f"System.load: no system {name_or_path!r} (shipped: {shipped}, or give a JSON path)")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise MpiparError(f"System.load: cannot read {path}: {e}") from None
        return cls(data, str(path))

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.data, indent=1) + "\n")

    def with_software(self, **changes) -> "System":
        """The same hardware running different training code (e.g. unfused attention, no DP overlap)."""
        data = copy.deepcopy(self.data)
        data["software"].update(changes)
        return System(data, self.path)

    def __repr__(self) -> str:
        return f"System({self.name!r})"

    # ---- compute -----------------------------------------------------------------------------
    def peak(self, dtype: str) -> float:
        if dtype not in self.peak_flops:
            raise MpiparError(f"System {self.name!r} has no peak rate for dtype {dtype!r}")
        return self.peak_flops[dtype]

    def with_load(self, load: float) -> "System":
        """The same host running `load` times slower than when it was calibrated (compute and
        collectives alike): a shared host measured again at run time (see runs.host_load)."""
        data = copy.deepcopy(self.data)
        data["load"] = float(load)
        return System(data, self.path)

    def for_arch(self, arch: str) -> "System":
        """This system as it runs a model of `arch`: its per-op overheads and FLOP rates scaled by
        compute_scale[arch] (itself when that is not calibrated).

        Why per arch: calibrate times the overhead on a tiny block and the rate on bare GEMMs, and
        the steps of eager training cost a different mix of the two, which depends on the ops a
        block runs (mpipar.plan.calibrate_fit.fit_compute)."""
        scale = self.compute_scale.get(arch)
        if scale is None and arch not in self.contention_split:
            return self
        cache = self.__dict__.setdefault("_arch_systems", {})
        hit = cache.get(arch)
        if hit is None:
            data = copy.deepcopy(self.data)
            data.pop("compute_scale", None)
            data["contention_mix"] = data.pop("contention_split", {}).get(arch, {})
            overhead, flops = scale or (1.0, 1.0)
            data["op_overhead"] = float(data["op_overhead"]) * overhead
            data["op_overhead_backward"] = self.op_overhead_b * overhead
            data["peak_flops"] = {k: float(v) / flops for k, v in data["peak_flops"].items()}
            hit = cache[arch] = System(data, self.path)
        return hit

    @property
    def load_factor(self) -> float:
        return float(self.data.get("load", 1.0))

    def slowdown(self, busy_ranks: float, work_share: float | None = None) -> float:
        """Compute slowdown when `busy_ranks` ranks compute at once on one host (1 on accelerators).

        work_share: the device-work fraction of that compute (PhaseCost.work_share). Where
        calibrate split the host's contention for this arch (for_arch), overhead and device
        work slow by their own factors: the host's cores are time-shared by both, and device
        work also shares the caches and memory bandwidth."""
        if not self.cores:
            return self.load_factor
        return max(1.0, self._level(busy_ranks) * self._split(busy_ranks, work_share)) * self.load_factor

    def _slowdown(self, busy_ranks: float) -> float:
        return max(1.0, self._level(busy_ranks)) if self.cores else 1.0

    def _level(self, busy_ranks: float) -> float:
        if len(self._table) == 1:
            return max(1.0, busy_ranks / float(self.cores))
        return _interpolate(self._table, busy_ranks)[0]

    def _split(self, busy_ranks: float, work_share: float | None) -> float:
        if len(self._mix) == 1 or work_share is None:
            return 1.0
        overhead, work = _interpolate(self._mix, busy_ranks)
        return overhead + (work - overhead) * work_share

    def op(self, work: float, backward: bool = False) -> float:
        """Time of one kernel / eager op doing `work` seconds of device work."""
        ovh = self.op_overhead_b if backward else self.op_overhead
        return work + ovh if self.add_overhead else max(work, ovh)

    def matmul(self, m: float, n: float, k: float, dtype: str, elem: int) -> float:
        """Seconds for an (m x k) @ (k x n) product, without launch overhead."""
        mm = self.data["matmul"]
        d = float(mm["half_dim"])
        eff = float(mm["efficiency"]) * (m / (m + d)) * (n / (n + d)) * (k / (k + d))
        flops = 2.0 * m * n * k
        return max(flops / (self.peak(dtype) * eff), (m * k + k * n + m * n) * elem / self.bandwidth)

    def attention(self, flops: float, nbytes: float, head_dim: int, dtype: str) -> float:
        """Seconds of a fused attention kernel doing `flops` and moving `nbytes`."""
        at = self.data["attention"]
        d = float(at["half_dim"])
        eff = float(at["efficiency"]) * head_dim / (head_dim + d)
        return max(flops / (self.peak(dtype) * eff), nbytes / self.bandwidth)

    def memory_bound(self, nbytes: float) -> float:
        return nbytes / self.bandwidth

    # ---- communication -------------------------------------------------------------------------
    def link(self, size: int, stride: int) -> tuple[float, float, float, float]:
        """(alpha, beta, p2p_alpha, p2p_beta) of a group of `size` ranks `stride` apart (ranks fill nodes in order)."""
        intra = self.data["links"]["intra"]
        if size * stride <= self.ranks_per_node:
            return (float(intra["alpha"]), 1.0 / float(intra["bandwidth"]),
                    float(intra.get("p2p_alpha", intra["alpha"])),
                    1.0 / float(intra.get("p2p_bandwidth", intra["bandwidth"])))
        inter = self.data["links"]["inter"]
        per_node = max(1, min(size, self.ranks_per_node // stride))  # group members sharing a node's NICs
        bw = min(float(intra["bandwidth"]), float(inter["bandwidth"]) * per_node)
        return (float(inter["alpha"]), 1.0 / bw, float(inter.get("p2p_alpha", inter["alpha"])),
                1.0 / float(inter.get("p2p_bandwidth", inter["bandwidth"])))

    def collective(self, op: str, nbytes: float, size: int, stride: int = 1, calls: int = 1,
                   host: int | None = None) -> float:
        """Seconds of `calls` collectives `op` moving `nbytes` in total on a group of `size` ranks.

        host: ranks busy on the node (calibrated CPU hosts measure groups of 2 while 4 ranks run)."""
        if size <= 1 or calls <= 0:
            return 0.0
        key = (op, nbytes, size, stride, calls, host)
        hit = self._memo.get(key)
        if hit is None:
            if len(self._memo) > 100_000:
                self._memo.clear()
            hit = self._memo[key] = self._collective(op, nbytes, size, stride, calls, host or size) * self.load_factor
        return hit

    def _fit(self, op: str, size: int, host: int):
        """The calibrated fit for `op` on `size` ranks with the most host ranks measured up to `host`."""
        best = None
        for (o, n, h), ab in self.collectives.items():
            if o == op and n == size and h <= max(host, size) and (best is None or h > best[0]):
                best = (h, ab)
        return None if best is None else best[1]

    def sync_share(self, size: int, host: int) -> float:
        """sync_share of a group of `size` ranks while `host` ranks are busy (0 when not smaller)."""
        if not self.shares or host is None or size >= host:
            return 0.0
        best = max(((h, f) for (n, h), f in self.shares.items() if n == size and h <= host), default=(0, 0.0))
        return best[1]

    def _sync(self, size: int, host: int) -> float:
        """sync_after_compute of a group spanning the host's busy ranks (0 otherwise, or if not measured)."""
        return self.sync.get((size, size), 0.0) if host <= size else 0.0

    def _collective(self, op: str, nbytes: float, size: int, stride: int, calls: int, host: int) -> float:
        fit = self._fit(op, size, host) if self.collectives else None
        if fit is not None and size * stride <= self.ranks_per_node:
            return calls * max(fit[0], self._sync(size, host)) + nbytes * fit[1]
        alpha, beta, p2p_alpha, p2p_beta = self.link(size, stride)
        if op == "send_recv":
            return calls * p2p_alpha + nbytes * p2p_beta
        return calls * ring_cost(op, 0.0, size, alpha, beta) + ring_cost(op, nbytes, size, 0.0, beta)
