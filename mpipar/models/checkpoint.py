"""Sharded, atomic checkpoints that load into any layout, with checksums; loading runs no code.

    save(model, optimizer, path, extra=None)              # collective over the model's mesh
    extra = load(model, optimizer, path)                  # any other layout, or the serial model
    save_step(model, optimizer, run_dir, step, keep=2)    # run_dir/step-000040/, the newest `keep` kept
    latest(run_dir)                                       # newest complete step folder, or None
    loaded = load_full(model, optimizer, run_dir)         # .extra, .path, .rank_state

A checkpoint is a directory:
  shard-pp{P}-tp{T}.pt  one per (pipeline stage, tensor-parallel rank), written by
                        the dp = sp = 0 rank of that coordinate: its local
                        parameters and optimizer state, under serial names
  rank{R}.pt            optional per-rank state (`rank_state`, e.g. RNG states)
  meta.json             optimizer hyperparameters (param_groups) and `extra` (JSON)
  manifest.json         written last: config, layout, world size, every file's
                        sha256 and size, and for every serial tensor its full
                        shape, split (dim, stride) and which file holds each part

Atomic: everything is written into a hidden temporary folder next to the
target (`.step-000040.tmp-<host>-<pid>`), each file fsynced, the manifest
last, the folder fsynced, then renamed into place and the parent fsynced. A
save killed at any moment (or failing on a full disk) leaves the previous
checkpoints as they were and no folder that `latest` or `load` would pick;
the next `save_step` in that run folder removes the leftovers of dead writers.

Loading reads the manifest, checks the size and sha256 of every file this
rank needs (a missing, truncated or changed file raises MpiparError naming it,
on every rank), assembles each full tensor from its parts and keeps this
rank's shard for the NEW layout. Tensors are read with
`torch.load(weights_only=True)` and metadata as JSON, so a file carrying a
pickle payload is refused naming it, never run. Given a run folder, `load`
takes the newest complete step folder and, if that one is damaged, falls back
to the next older one with a warning. Every decision that could differ
between ranks (a file one rank cannot read) is agreed before acting, so all
ranks raise, fall back or succeed together. The serial model saves and loads
without MPI.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import socket
import time
import warnings

import torch

from ..errors import MpiparError, agree
from .gpt import SerialGPT
from .shards import assemble, serial_specs, take_shard
from .zero import checkpoint as zero_checkpoint

FORMAT = "mpipar-gpt-checkpoint"
VERSION = 2
VERSIONS = (1, 2)  # version 1 kept its metadata in meta.pt (read here with weights_only=True)
MANIFEST = "manifest.json"
META = "meta.json"
LEGACY_META = "meta.pt"
STEP = re.compile(r"^step-(\d+)$")
LEFTOVER = re.compile(r"^\.(step-\d+)\.(tmp|old)-(.+)-(\d+)$")
PAUSE_ENV = "MPIPAR_CHECKPOINT_PAUSE_S"  # test hook: rank 0 sleeps this long with the shards written
CONFIG_KEYS = ("vocab_size", "seq_len", "hidden", "num_heads", "num_layers", "ffn_hidden", "tied", "arch",
               "num_kv_heads")


class _Ctx:
    """This rank's view: specs, shard coordinates and the world communicator (None: serial)."""

    def __init__(self, model):
        self.serial = isinstance(model, SerialGPT)
        if self.serial:
            self.specs, self.comm, self.rank, self.size = serial_specs(model), None, 0, 1
            self.coords, self.layout = {"pp": 0, "tp": 0, "dp": 0, "sp": 0}, {"tp": 1, "pp": 1, "sp": 1, "dp": 1}
        else:
            mesh = model.mesh
            self.specs, self.comm = model.specs(), mesh.world.comm
            self.rank, self.size = mesh.world.rank, mesh.world.comm.Get_size()
            self.coords, self.layout = dict(mesh.coords), dict(mesh.shape)
        self.cfg = model.cfg

    @property
    def writer(self) -> bool:
        return self.coords["dp"] == 0 and self.coords["sp"] == 0

    @property
    def shard_file(self) -> str:
        return f"shard-pp{self.coords['pp']}-tp{self.coords['tp']}.pt"

    def agree(self, err) -> None:
        if self.comm is None:
            if err is not None:
                raise MpiparError(err)
        else:
            agree(self.comm, err)

    def gather(self, obj):
        return [obj] if self.comm is None else self.comm.gather(obj, root=0)

    def bcast(self, obj):
        return obj if self.comm is None else self.comm.bcast(obj, root=0)

    def on_root(self, what: str, fn):
        """Run fn() on rank 0, agree on its failure, broadcast its result."""
        result, err = None, None
        if self.rank == 0:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - reported on every rank
                err = f"{what}: {type(exc).__name__}: {exc}"
        self.agree(err)
        return self.bcast(result)


@dataclasses.dataclass
class Loaded:
    """What `load_full` returns: `save`'s extra, the folder it came from, this rank's saved state
    (None unless the checkpoint was written by the same world size and layout)."""

    extra: object
    path: str
    rank_state: object = None


# ---------------------------------------------------------------- writing

def _serialize(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _write_file(path: str, data: bytes) -> dict:
    """Write and fsync `data` to `path` (inside the temporary folder); {"sha256", "bytes"}."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _state_of(optimizer, param) -> dict:
    if optimizer is None:
        return {}
    state = optimizer.state.get(param, {})
    return {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in state.items()}


def _meta_json(optimizer, extra) -> bytes:
    groups = [] if optimizer is None else [{k: v for k, v in g.items() if k != "params"}
                                           for g in optimizer.param_groups]
    try:
        return json.dumps({"param_groups": groups, "extra": extra}, indent=1, sort_keys=True).encode()
    except (TypeError, ValueError) as exc:
        raise MpiparError(f"checkpoint extra and optimizer hyperparameters must be JSON "
                          f"(numbers, strings, lists, dicts): {exc}") from None


def _temp_name(path: str, kind: str) -> str:
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.{kind}-{socket.gethostname()}-{os.getpid()}")


def save(model, optimizer, path: str, extra=None, rank_state=None) -> str:
    """Write a sharded checkpoint of `model` (and `optimizer`, may be None) to folder `path`, atomically.

    Collective over the model's mesh. `extra` (JSON: e.g. {"step": 100}) is returned by `load`;
    `rank_state` (tensors, numbers, strings in dicts/lists/tuples; may differ per rank) is
    returned to the same rank by `load_full` on the same world size and layout. An existing
    `path` is replaced. Raises MpiparError on every rank if any rank failed; then `path` is as before.
    """
    if getattr(model, "zero", 0):
        return zero_checkpoint.save(model, optimizer, path, extra, rank_state)  # every rank its own shards
    ctx = _Ctx(model)
    path = os.path.abspath(path)

    def prepare():
        meta = _meta_json(optimizer, extra)  # refused before anything is written
        tmp = _temp_name(path, "tmp")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.mkdir(tmp)
        return tmp, meta

    tmp, meta = ctx.on_root(f"checkpoint.save: cannot prepare {path}", prepare)
    try:
        report, err = {"files": {}, "tensors": {}}, None
        try:
            if ctx.writer:
                _write_shard(ctx, optimizer, tmp, report)
            if rank_state is not None:
                name = f"rank{ctx.rank}.pt"
                report["files"][name] = _write_file(os.path.join(tmp, name), _serialize(rank_state))
                report["rank_file"] = name
        except Exception as exc:  # noqa: BLE001 - reported on every rank
            err = f"checkpoint.save: writing {path} failed on this rank: {type(exc).__name__}: {exc}"
        ctx.agree(err)
        reports = ctx.gather(report)
        ctx.on_root(f"checkpoint.save: finishing {path} failed",
                    lambda: _finish(ctx, tmp, path, meta, reports))
    except MpiparError:
        if ctx.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_shard(ctx: _Ctx, optimizer, folder: str, report: dict) -> None:
    params, optim = {}, {}
    for s in ctx.specs:
        if not s.primary:
            continue
        params[s.name] = s.param.detach().cpu().clone()
        optim[s.name] = _state_of(optimizer, s.param)
        report["tensors"][s.name] = {"shape": s.full_shape(), "dtype": str(s.param.dtype).replace("torch.", ""),
                                     "dim": s.dim if s.sharded else None, "stride": s.stride,
                                     "part": s.part if s.sharded else 0, "parts": s.parts if s.sharded else 1,
                                     "file": ctx.shard_file}
    data = _serialize({"params": params, "optim": optim})
    report["files"][ctx.shard_file] = _write_file(os.path.join(folder, ctx.shard_file), data)


def _finish(ctx: _Ctx, tmp: str, path: str, meta: bytes, reports: list) -> None:
    """Rank 0: meta, manifest last, fsync the folder, rename it into place, fsync the parent."""
    pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
    if pause > 0:
        time.sleep(pause)
    files = {META: _write_file(os.path.join(tmp, META), meta)}
    tensors: dict = {}
    rank_files = {}
    for rank, r in enumerate(reports):
        files.update(r["files"])
        if "rank_file" in r:
            rank_files[str(rank)] = r["rank_file"]
        for name, t in r["tensors"].items():
            entry = tensors.setdefault(name, {k: t[k] for k in ("shape", "dtype", "dim", "stride", "parts")})
            entry.setdefault("files", {})[str(t["part"])] = t["file"]
    manifest = {"format": FORMAT, "version": VERSION, "config": ctx.cfg.to_dict(), "layout": ctx.layout,
                "world_size": ctx.size, "files": files, "tensors": tensors, "rank_files": rank_files}
    _write_file(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())
    _fsync_dir(tmp)
    old = None
    if os.path.lexists(path):
        old = _temp_name(path, "old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync_dir(os.path.dirname(path))
    if old:
        shutil.rmtree(old, ignore_errors=True)


def step_path(run_dir: str, step: int) -> str:
    """run_dir/step-NNNNNN: where `save_step` puts step `step`."""
    return os.path.join(run_dir, f"step-{int(step):06d}")


def steps(run_dir: str) -> list[tuple[int, str]]:
    """(step, folder) of every complete checkpoint (one with a manifest) in `run_dir`, oldest first."""
    try:
        names = os.listdir(run_dir)
    except OSError:
        return []
    found = [(int(m.group(1)), os.path.join(run_dir, n)) for n in names if (m := STEP.match(n))]
    return sorted((s, p) for s, p in found if os.path.isfile(os.path.join(p, MANIFEST)))


def latest(run_dir: str) -> str | None:
    """The newest complete step folder in `run_dir`, or None. Not collective (reads the folder)."""
    found = steps(run_dir)
    return found[-1][1] if found else None


def clean_leftovers(run_dir: str) -> list[str]:
    """Remove the temporary folders of killed saves on this host (their writer is gone).

    A folder moved aside while replacing a step (`.step-N.old-*`) whose replacement never
    landed is moved back. Returns what was removed or restored. Not collective."""
    done = []
    host = socket.gethostname()
    for name in sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []:
        m = LEFTOVER.match(name)
        if not m or m.group(3) != host or _alive(int(m.group(4))):
            continue
        leftover, target = os.path.join(run_dir, name), os.path.join(run_dir, m.group(1))
        if m.group(2) == "old" and not os.path.exists(target) and os.path.isfile(os.path.join(leftover, MANIFEST)):
            os.rename(leftover, target)
        else:
            shutil.rmtree(leftover, ignore_errors=True)
        done.append(leftover)
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_step(model, optimizer, run_dir: str, step: int, extra=None, keep: int = 2, rank_state=None) -> str:
    """Save into run_dir/step-NNNNNN (atomic, `extra` gets "step"), then keep only the newest `keep`
    complete step folders (keep <= 0: all). Collective. Returns the new folder."""
    ctx = _Ctx(model)
    ctx.on_root(f"checkpoint.save_step: cannot prepare {run_dir}",
                lambda: (os.makedirs(run_dir, exist_ok=True), clean_leftovers(run_dir)))
    path = save(model, optimizer, step_path(run_dir, step), {**(extra or {}), "step": int(step)}, rank_state)
    if ctx.rank == 0 and keep > 0:
        for _, old in steps(run_dir)[:-keep]:
            try:
                shutil.rmtree(old)
            except OSError as exc:  # a folder left behind costs disk, not correctness
                warnings.warn(f"checkpoint.save_step: cannot remove {old}: {exc}", stacklevel=2)
    return path


# ---------------------------------------------------------------- reading

def load(model, optimizer, path: str):
    """Load a checkpoint into `model` (any layout) and `optimizer` (may be None); returns its `extra`.

    `path` is a checkpoint folder or a run folder of `save_step` (then: the newest complete
    step, or an older one if the newest is damaged). Collective over the model's mesh. Raises
    MpiparError on every rank, before changing anything, if the checkpoint is incomplete, a
    file is missing, truncated, changed or carries a pickle payload, or the model shape differs.
    """
    return load_full(model, optimizer, path).extra


def load_full(model, optimizer, path: str) -> Loaded:
    """`load`, also returning the folder used and this rank's `rank_state` (see `Loaded`)."""
    ctx = _Ctx(model)
    path = os.path.abspath(path)

    def candidates():
        if os.path.isfile(os.path.join(path, MANIFEST)) or not os.path.isdir(path):
            return [path]
        found = [p for _, p in reversed(steps(path))]
        return found or [path]

    tried = ctx.on_root(f"checkpoint {path}: cannot list", candidates)
    errors = []
    for i, folder in enumerate(tried):
        try:
            loaded = _load_one(ctx, model, optimizer, folder)
        except MpiparError as exc:
            errors.append(str(exc))
            if i + 1 < len(tried) and ctx.rank == 0:
                warnings.warn(f"{exc}; falling back to the older checkpoint {tried[i + 1]}", stacklevel=2)
            continue
        if errors and ctx.rank == 0:
            warnings.warn(f"checkpoint {path}: loaded the older {folder} ({len(errors)} newer one(s) damaged)",
                          stacklevel=2)
        return loaded
    if len(errors) == 1:
        raise MpiparError(errors[0])
    raise MpiparError(f"checkpoint {path}: none of its {len(errors)} step folders loads: " + " | ".join(errors))


def _load_one(ctx: _Ctx, model, optimizer, path: str) -> Loaded:
    if getattr(model, "zero", 0) or zero_checkpoint.is_zero_checkpoint(path):  # ZeRO: its own shards
        extra, rank_state = zero_checkpoint.load(model, optimizer, path, ctx)
        return Loaded(extra, path, rank_state)
    manifest, err = _read_manifest(path, ctx.cfg)
    ctx.agree(err)
    try:
        names = {s.name for s in ctx.specs}
        missing = sorted(names - set(manifest["tensors"]))
        if missing:
            raise MpiparError(f"checkpoint {path}: no tensor {missing[0]} in the manifest")
        meta_file = META if manifest["version"] >= 2 else LEGACY_META
        same_layout = manifest.get("world_size") == ctx.size and manifest.get("layout") == ctx.layout
        rank_file = manifest.get("rank_files", {}).get(str(ctx.rank)) if same_layout else None
        needed = {meta_file} | {f for n in names for f in manifest["tensors"][n]["files"].values()}
        needed |= {rank_file} if rank_file else set()
        err = next((e for e in (_verify(path, f, manifest["files"].get(f)) for f in sorted(needed)) if e), None)
    except MpiparError as exc:
        err = str(exc)
    except (OSError, KeyError, TypeError, AttributeError) as exc:
        err = f"checkpoint {path}: malformed manifest or unreadable file: {type(exc).__name__}: {exc}"
    ctx.agree(err)
    files, err = {}, None
    try:
        for f in sorted(needed):
            files[f] = _read_meta_json(path, f) if f == META else _torch_load(path, f)
        values = [_local_values(s, manifest["tensors"][s.name], files) for s in ctx.specs]
        groups = files[meta_file]["param_groups"]
        if optimizer is not None and len(groups) not in (0, len(optimizer.param_groups)):
            raise MpiparError(f"the checkpoint has {len(groups)} optimizer param groups, "
                              f"the optimizer {len(optimizer.param_groups)}")
    except MpiparError as exc:
        err = str(exc)
    except Exception as exc:  # noqa: BLE001 - reported on every rank
        err = f"checkpoint {path}: cannot load: {type(exc).__name__}: {exc}"
    ctx.agree(err)
    with torch.no_grad():
        for s, (param, state) in zip(ctx.specs, values):
            s.param.copy_(param)
            if optimizer is not None and state:
                optimizer.state[s.param] = {k: _placed(v, s.param) for k, v in state.items()}
    if optimizer is not None:
        for group, saved in zip(optimizer.param_groups, groups):
            group.update({k: tuple(v) if isinstance(group.get(k), tuple) and isinstance(v, list) else v
                          for k, v in saved.items()})
    return Loaded(files[meta_file]["extra"], path, files[rank_file] if rank_file else None)


def _torch_load(path: str, name: str):
    """torch.load with weights_only=True: tensors and plain containers only; a payload is refused."""
    try:
        return torch.load(os.path.join(path, name), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ""
        raise MpiparError(f"checkpoint {path}: file {name} holds objects other than tensors and plain "
                          f"data (a pickle payload?); refused, loading never runs code ({first})") from None


def _read_meta_json(path: str, name: str) -> dict:
    try:
        with open(os.path.join(path, name), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise MpiparError(f"checkpoint {path}: file {name} is not readable JSON: {exc}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("param_groups"), list):
        raise MpiparError(f"checkpoint {path}: file {name} has no param_groups list")
    return meta


def _placed(value, param):
    """Optimizer state shaped like its parameter goes to its device and dtype; the rest stays."""
    if torch.is_tensor(value) and value.shape == param.shape and value.dim():
        return value.to(device=param.device, dtype=param.dtype)
    return value


def _read_manifest(path: str, cfg):
    """(manifest, None) or (None, error message)."""
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        return None, f"checkpoint {path}: no {MANIFEST} (missing directory or an incomplete save)"
    try:
        with open(file, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        return None, f"checkpoint {path}: unreadable {MANIFEST}: {exc}"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") not in VERSIONS:
        return None, f"checkpoint {path}: not an {FORMAT} manifest of version {VERSIONS}"
    saved, mine = manifest.get("config"), cfg.to_dict()
    saved = saved if isinstance(saved, dict) else {}
    saved = {"arch": "gpt2", "num_kv_heads": saved.get("num_heads"), **saved}  # manifests before arch
    diff = [k for k in CONFIG_KEYS if saved.get(k) != mine[k]]
    if diff:
        return None, (f"checkpoint {path}: model shape differs: " +
                      ", ".join(f"{k} saved {saved.get(k)} != {mine[k]}" for k in diff))
    return manifest, None


def _verify(path: str, name: str, info) -> str | None:
    """None if file `name` exists with the size and sha256 the manifest records."""
    file = os.path.join(path, name)
    if info is None:
        return f"checkpoint {path}: shard {name} is not listed in the manifest"
    if os.path.basename(name) != name or name.startswith("."):
        return f"checkpoint {path}: manifest names a file outside the checkpoint: {name!r}"
    if not os.path.isfile(file):
        return f"checkpoint {path}: shard {name} is missing"
    size = os.path.getsize(file)
    if size != info["bytes"]:
        return f"checkpoint {path}: shard {name} is truncated or altered ({size} bytes, expected {info['bytes']})"
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != info["sha256"]:
        return f"checkpoint {path}: shard {name} is corrupt (sha256 mismatch)"
    return None


def _local_values(spec, entry: dict, files: dict):
    """(this rank's parameter shard, its optimizer state) for the new layout."""
    parts = [files[entry["files"][str(r)]] for r in range(entry["parts"])]
    dim = entry["dim"]
    pieces = [p["params"][spec.name] for p in parts]
    full = assemble(pieces, dim, entry["stride"])
    if list(full.shape) != list(entry["shape"]):
        raise MpiparError(f"{spec.name}: assembled shape {list(full.shape)} != {entry['shape']}")
    local = take_shard(full, spec.part, spec.parts, spec.dim if spec.sharded else None, spec.stride)
    if local.shape != spec.param.shape:
        raise MpiparError(f"{spec.name}: shard shape {tuple(local.shape)} != parameter {tuple(spec.param.shape)}")
    states = [p["optim"].get(spec.name, {}) for p in parts]
    state = {}
    for key, value in states[0].items():
        if torch.is_tensor(value) and all(torch.is_tensor(s.get(key)) and s[key].shape == pc.shape
                                          for s, pc in zip(states, pieces)) and value.dim():
            value = assemble([s[key] for s in states], dim, entry["stride"])
            value = take_shard(value, spec.part, spec.parts, spec.dim if spec.sharded else None, spec.stride)
        state[key] = value.clone() if torch.is_tensor(value) else value
    return local, state
