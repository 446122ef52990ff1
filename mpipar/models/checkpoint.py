"""Sharded, atomic checkpoints that load into any layout, with checksums; loading runs no code.

    save(model, optimizer, path, extra=None)              # collective over the model's mesh
    extra = load(model, optimizer, path)                  # any other layout, or the serial model
    save_step(model, optimizer, run_dir, step, keep=2)    # run_dir/step-000040/, the newest `keep` kept
    latest(run_dir)                                       # newest complete step folder, or None
    loaded = load_full(model, optimizer, run_dir)         # .extra, .path, .rank_state

Files: see checkpoint_files.py. Atomic: written into a hidden temporary folder
next to the target, each file fsynced, the manifest last, the folder fsynced,
renamed into place, the parent fsynced. A save killed at any moment (or failing on a full disk) leaves
the previous checkpoints as they were and no folder that `latest` or `load`
would pick; the next `save_step` removes the leftovers of dead writers.

Loading checks the size and sha256 of every file this rank needs (a missing,
truncated or changed file raises MpiparError naming it), assembles each full
tensor from its parts and keeps this rank's shard for the NEW layout. Tensors
are read with `torch.load(weights_only=True)`, metadata as JSON: a file
carrying a pickle payload is refused naming it, never run. Given a run folder,
`load` takes the newest complete step, falling back to an older one (with a
warning) if it is damaged. Every decision that could differ between ranks is
agreed before acting: all ranks raise, fall back or succeed together. The
serial model saves and loads without MPI.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings

import torch

from ..agree import agree
from ..errors import MpiparError
from .checkpoint_files import (FORMAT, LEGACY_META, MANIFEST, META, VERSION, clean_leftovers, latest, local_values,
                               meta_json, placed, publish, read_manifest, read_meta_json, serialize, state_of,
                               step_path, steps, temp_name, torch_load, verify, write_file)
from .gpt import SerialGPT
from .shards import serial_specs
from .zero import checkpoint as zero_checkpoint

__all__ = ["save", "load", "load_full", "save_step", "latest", "steps", "step_path", "Loaded"]


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
    """`load_full`'s answer: extra, folder, this rank's rank_state (None unless same world and layout)."""

    extra: object
    path: str
    rank_state: object = None


def save(model, optimizer, path: str, extra=None, rank_state=None) -> str:
    """Write a sharded checkpoint of `model` (and `optimizer`, may be None) to folder `path`, atomically.

    Collective over the model's mesh. `extra` (JSON: e.g. {"step": 100}) is returned by `load`;
    `rank_state` (tensors, numbers, strings in dicts/lists/tuples; may differ per rank) is
    returned to the same rank by `load_full` on the same world size and layout. An existing
    `path` is replaced. Raises MpiparError on every rank if any rank failed; then `path` is as before.
    """
    if getattr(model, "zero", 0):
        return zero_checkpoint.save(model, optimizer, path, _Ctx(model), extra, rank_state)  # every rank its own shards
    ctx = _Ctx(model)
    path = os.path.abspath(path)

    def prepare():
        meta = meta_json(optimizer, extra)  # refused before anything is written
        tmp = temp_name(path, "tmp")
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
                report["files"][name] = write_file(os.path.join(tmp, name), serialize(rank_state))
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
        optim[s.name] = state_of(optimizer, s.param)
        report["tensors"][s.name] = {"shape": s.full_shape(), "dtype": str(s.param.dtype).replace("torch.", ""),
                                     "dim": s.dim if s.sharded else None, "stride": s.stride,
                                     "part": s.part if s.sharded else 0, "parts": s.parts if s.sharded else 1,
                                     "file": ctx.shard_file}
    data = serialize({"params": params, "optim": optim})
    report["files"][ctx.shard_file] = write_file(os.path.join(folder, ctx.shard_file), data)


def _finish(ctx: _Ctx, tmp: str, path: str, meta: bytes, reports: list) -> None:
    """Rank 0: meta, manifest last, then publish the folder."""
    files = {META: write_file(os.path.join(tmp, META), meta)}
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
    write_file(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())
    publish(tmp, path)


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
        return loaded
    if len(errors) == 1:
        raise MpiparError(errors[0])
    raise MpiparError(f"checkpoint {path}: none of its {len(errors)} step folders loads: " + " | ".join(errors))


def _load_one(ctx: _Ctx, model, optimizer, path: str) -> Loaded:
    if getattr(model, "zero", 0) or zero_checkpoint.is_zero_checkpoint(path):  # ZeRO: its own shards
        extra, rank_state = zero_checkpoint.load(model, optimizer, path, ctx)
        return Loaded(extra, path, rank_state)
    manifest, err = read_manifest(path, ctx.cfg)
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
        err = next((e for e in (verify(path, f, manifest["files"].get(f)) for f in sorted(needed)) if e), None)
    except MpiparError as exc:
        err = str(exc)
    except (OSError, KeyError, TypeError, AttributeError) as exc:
        err = f"checkpoint {path}: malformed manifest or unreadable file: {type(exc).__name__}: {exc}"
    ctx.agree(err)
    files, err = {}, None
    try:
        for f in sorted(needed):
            files[f] = read_meta_json(path, f) if f == META else torch_load(path, f)
        values = [local_values(s, manifest["tensors"][s.name], files) for s in ctx.specs]
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
                optimizer.state[s.param] = {k: placed(v, s.param) for k, v in state.items()}
    if optimizer is not None:
        for group, saved in zip(optimizer.param_groups, groups):
            group.update({k: tuple(v) if isinstance(group.get(k), tuple) and isinstance(v, list) else v
                          for k, v in saved.items()})
    return Loaded(files[meta_file]["extra"], path, files[rank_file] if rank_file else None)


