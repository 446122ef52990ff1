"""Settings: every `MPIPAR_*` environment variable, read in one place into one frozen object.

`current()` is what the code asks (an attribute read, so nothing on a hot path
touches the environment). The environment is read on first use and again by
every `Mesh()`, which also agrees the values across the world (a rank that
sees different values would pick a different algorithm and hang the others),
so a mismatch is an MpiparError on every rank. Launcher facts that may differ
per node (ranks on this node) are read here too but not agreed.

Values are parsed at load; a malformed number raises MpiparError naming the
variable. Flags whose legal values are checked where they are used (by a
collective call that raises on every rank) stay strings.

The README's "Environment variables" table is `markdown_table()`; a unit test
checks that the two agree.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from types import MappingProxyType

from .errors import MpiparError

# Large CPU tensors on transparent huge pages: MPI's shared-memory copies of 2 MiB pages are
# faster (results/README.md). torch reads this once, at its first allocation, so it is set
# when mpipar is imported (before torch); THP_MEM_ALLOC_ENABLE=0 in the environment opts out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast")
LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE",
                   "PALS_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")
LOCAL_RANK_VARS = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK",
                   "PALS_LOCAL_RANKID", "SLURM_LOCALID")


def _opt(env: str, doc: str, kind: str = "str", default=None, agreed: bool = True):
    meta = {"env": env, "doc": doc, "kind": kind, "agreed": agreed}
    if kind == "per_op":  # op -> bytes, only the ops the environment names
        return field(default_factory=lambda: MappingProxyType({}), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    # -- collectives ------------------------------------------------------------------------------
    validate: str | None = _opt(
        "MPIPAR_VALIDATE",
        "`0`: skip the per-call agreement of collective arguments across ranks (saves one small Allgather "
        "per all_reduce, broadcast or reduce_scatter, which also carries tensors of at most 4 KiB, so those "
        "then cost their own collective; all_gather always agrees, as it needs every rank's size; a "
        "mismatch may then hang)")
    fast_agreement: str = _opt(
        "MPIPAR_FAST_AGREEMENT",
        "`0`: a validated CPU collective runs its Python path (default: one C call, "
        "`mpipar/comm/agreement/fast.c`, built with `cc` or `$CC` on first use, where ranks have their own "
        "cores or share one node's, and the flight recorder is C: a call of at most 4 KiB rides on the "
        "agreement, a larger one goes to MPI's collective from C; the same protocol and bits either way)",
        default="1", agreed=False)
    cma: str | None = _opt(
        "MPIPAR_CMA",
        "`0`: ranks that share a node's cores do not read each other's memory with process_vm_readv "
        "(cross-memory attach: one copy; `mpipar/comm/agreement/cma.py`), so an all_to_all past the "
        "payload slots goes to MPI's collective after the agreement (default: on where every rank can)")
    crossover: MappingProxyType = _opt(
        "MPIPAR_CROSSOVER_<OP>",
        "bytes from which `algorithm=\"auto\"` switches from MPI's collective to the ring; OP is "
        "`ALL_REDUCE`, `ALL_GATHER` or `REDUCE_SCATTER` (defaults in `mpipar/comm/tuning.py`)", "per_op")
    ring_ceiling: MappingProxyType = _opt(
        "MPIPAR_RING_CEILING_<OP>",
        "bytes from which `\"auto\"` goes back to MPI's collective (the ring's window is "
        "[crossover, ceiling))", "per_op")
    ring_piece_bytes: int | None = _opt(
        "MPIPAR_RING_PIECE_BYTES", "pieces in which the ring's reduce steps are pipelined (default 1 MiB)", "int")
    output_pool_bytes: int | None = _opt(
        "MPIPAR_OUTPUT_POOL_BYTES",
        "free memory kept for recycling the outputs of all_gather, reduce_scatter and all_to_all on CPU "
        "(default 1 GiB; 0 turns recycling off; `mpipar/comm/outputs.py`)", "int")
    force_staging: str | None = _opt(
        "MPIPAR_FORCE_STAGING",
        "`1` (test-only): every tensor passes through host staging buffers, as a CUDA tensor does with an "
        "MPI that is not CUDA-aware")
    # -- node shared memory -----------------------------------------------------------------------
    shm_crossover: MappingProxyType = _opt(
        "MPIPAR_SHM_CROSSOVER_<OP>",
        "bytes from which `\"auto\"` uses shared memory for symmetric tensors (OP also `BROADCAST`)", "per_op")
    shm_pooled_output_bytes: int | None = _opt(
        "MPIPAR_SHM_POOLED_OUTPUT_BYTES",
        "bytes from which shared-memory all_gather/reduce_scatter outputs live in symmetric windows, and "
        "the all-gather pushes instead of pulling (default: all_gather from 32 MiB; reduce_scatter never)",
        "int")
    shm_compiled: str | None = _opt(
        "MPIPAR_SHM_COMPILED",
        "`0`: no compiled kernels in the shared-memory collectives (`mpipar/comm/symmetric/compiled.c`: "
        "the all-reduce's one-call sum-and-push for float32/64 and int32/64, streaming copies and the "
        "one-read fan-out in all_gather and broadcast): numpy instead, the same results bit for bit. The "
        "kernels are built with `cc` or `$CC` on first use; numpy is used anyway where no compiler is found")
    shm_stream_bytes: int | None = _opt(
        "MPIPAR_SHM_STREAM_BYTES",
        "bytes from which those copies use non-temporal (streaming) stores (default 8 MiB)", "int")
    shm_chunk_bytes: int | None = _opt(
        "MPIPAR_SHM_CHUNK_BYTES", "bytes per cache-sized chunk of the shared-memory reductions (default 512 KiB)",
        "int")
    symmetric_activations: str | None = _opt(
        "MPIPAR_SYMMETRIC_ACTIVATIONS",
        "`0`/`1`: tensor-parallel all-reduces (`reduce_from_region` forward, `copy_to_region` backward) run "
        "on a copy born in symmetric shared memory (default: on when the group is on one node and the "
        "tensor is at least 1 MiB)")
    symmetric_buckets: str | None = _opt(
        "MPIPAR_SYMMETRIC_BUCKETS",
        "`0`/`1`: data-parallel gradient buckets in symmetric shared memory (default: on when the dp group "
        "is on one node and buckets pass the shm crossover); also ZeRO's flat buffers (default: on when the "
        "dp group is on one node; `1` where it applies: mpipar.models.zero.shared)")
    kernel_cache: str | None = _opt(
        "MPIPAR_KERNEL_CACHE",
        "where the kernels are built (default `$XDG_CACHE_HOME/mpipar`, else `~/.cache/mpipar`)")
    fake_ranks_per_node: int | None = _opt(
        "MPIPAR_FAKE_RANKS_PER_NODE",
        "k (test-only): groups split into fake nodes of k consecutive ranks, so the inter-node "
        "(hierarchical) path runs on one machine", "int")
    # -- jobs that never hang (mpipar.flight) ------------------------------------------------------
    timeout: float = _opt(
        "MPIPAR_TIMEOUT",
        "seconds a rank may wait inside one mpipar communication call before the watchdog writes its "
        "flight record and aborts the job (default 600; `0`: no watchdog)", "seconds", default=600.0)
    abort_on_error: str = _opt(
        "MPIPAR_ABORT_ON_ERROR",
        "`0`: building a Mesh leaves `sys.excepthook` and `threading.excepthook` alone (default: an "
        "unhandled exception on any rank, in any thread, aborts the whole job)", default="1")
    flight_dir: str = _opt(
        "MPIPAR_FLIGHT_DIR", "where flight records go, as `rank<R>.json` (default `mpipar-flight`)",
        default="mpipar-flight", agreed=False)
    flight_c: str = _opt(
        "MPIPAR_FLIGHT_C",
        "`0`: the flight recorder's per-call record stays pure Python (default: its C version, "
        "`mpipar/flight/ring.c`, built with `cc` or `$CC` on first import; Python where it cannot be built)",
        default="1", agreed=False)
    checkpoint_pause_s: float = _opt(
        "MPIPAR_CHECKPOINT_PAUSE_S",
        "seconds (test-only): rank 0 sleeps this long in each checkpoint save with the shards written and "
        "no manifest yet, so a test can kill a job mid-save", "seconds", default=0.0, agreed=False)
    # -- process: may differ per node, so not agreed ----------------------------------------------
    polite: str | None = _opt(
        "MPIPAR_POLITE",
        "`1`/`0`: force polite (test-and-sleep) waiting on or off; default on when ranks outnumber cores",
        agreed=False)
    threads: int | None = _opt(
        "MPIPAR_THREADS",
        "torch threads per rank (default `OMP_NUM_THREADS`, else cores of the node / the job's ranks on the node, as the launcher counts them, even for a mesh on a sub-communicator)",
        "int", agreed=False)
    cuda_aware: str = _opt(
        "MPIPAR_CUDA_AWARE",
        "`1`/`0`/`auto`: pass CUDA tensors straight to MPI, or stage through pinned host buffers (auto asks "
        "the MPI library)", default="auto", agreed=False)
    # -- facts of the launcher and the toolchain, read here so that no other module reads the environment
    omp_num_threads: int | None = _opt("OMP_NUM_THREADS", "", "int", agreed=False)
    local_size: int | None = _opt("|".join(LOCAL_SIZE_VARS), "", "local", agreed=False)
    local_rank: int | None = _opt("|".join(LOCAL_RANK_VARS), "", "local", agreed=False)
    mpir_enable_gpu: str = _opt("MPIR_CVAR_ENABLE_GPU", "", default="1", agreed=False)
    cc: str | None = _opt("CC", "", agreed=False)
    xdg_cache_home: str | None = _opt("XDG_CACHE_HOME", "", agreed=False)

    @classmethod
    def from_environ(cls, environ=None) -> "Settings":
        environ = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            env, kind = f.metadata["env"], f.metadata["kind"]
            if kind == "per_op":
                prefix = env[: -len("<OP>")]
                values[f.name] = MappingProxyType({op: _int(prefix + op.upper(), environ[prefix + op.upper()])
                                                   for op in OPS if environ.get(prefix + op.upper(), "").strip()})
            elif kind == "local":
                values[f.name] = next((int(environ[v]) for v in env.split("|")
                                       if environ.get(v, "").isdigit()), None)
            else:
                raw = environ.get(env)
                if raw is None or (kind in ("int", "seconds") and not raw.strip()):
                    continue
                values[f.name] = _int(env, raw) if kind == "int" else _seconds(env, raw) if kind == "seconds" \
                    else raw.strip()
        return cls(**values)

    def agreed_digest(self) -> bytes:
        """16 bytes that equal on two ranks iff their agreed settings do."""
        parts = [f"{f.name}={dict(v) if isinstance(v := getattr(self, f.name), MappingProxyType) else v!r}"
                 for f in dataclasses.fields(self) if f.metadata["agreed"]]
        return hashlib.blake2b(";".join(parts).encode(), digest_size=16).digest()


def _int(name: str, raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise MpiparError(f"{name} must be an integer, got {raw!r}") from None


def _seconds(name: str, raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        value = float("nan")
    if not value >= 0:  # also nan
        raise MpiparError(f"{name} must be a number of seconds >= 0, got {raw!r}")
    return value


_current: list[Settings] = []


def current() -> Settings:
    """The settings in force (read from the environment on first use)."""
    if not _current:
        _current.append(Settings.from_environ())
    return _current[0]


def reload(environ=None) -> Settings:
    """Read the environment again (Mesh() does; so do tests that set MPIPAR_* variables)."""
    s = Settings.from_environ(environ)
    _current[:] = [s]
    return s


@contextlib.contextmanager
def override(**changes):
    """Run a block with some fields changed (every rank must do the same)."""
    before = current()
    _current[:] = [dataclasses.replace(before, **changes)]
    try:
        yield _current[0]
    finally:
        _current[:] = [before]


def agree(comm) -> Settings:
    """Collective over `comm`: read the environment, and raise MpiparError on every rank unless
    every rank sees the same agreed settings (the error names the differing ranks)."""
    s = reload()
    if comm.Get_size() > 1:
        digests = comm.allgather(s.agreed_digest())
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            mine = {f.metadata["env"]: getattr(s, f.name) for f in dataclasses.fields(s)
                    if f.metadata["agreed"] and getattr(s, f.name) not in (None, {}, MappingProxyType({}))}
            raise MpiparError(f"MPIPAR_* settings differ across ranks: ranks {differ} see other values than "
                              f"rank 0 (this rank, {comm.Get_rank()}, sees {mine}); every rank must get the "
                              "same environment")
    return s


def markdown_table() -> str:
    """The README's table of environment variables, made from the fields."""
    rows = ["| variable | meaning |", "|---|---|"]
    for f in dataclasses.fields(Settings):
        if f.metadata["doc"]:
            rows.append(f"| `{f.metadata['env']}` | {f.metadata['doc']} |")
    return "\n".join(rows)
