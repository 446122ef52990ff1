"""Checkpoints of ZeRO models: every rank writes its own shards, nothing is gathered.

`models.save` / `models.load` come here for a model with zero >= 1 and for a
checkpoint written by one. Saved atomically as mpipar.models.checkpoint does
(a temporary folder, renamed into place once the manifest is in); the folder:
  zero-pp{P}-tp{T}-d{R}.pt  one per rank: for every serial tensor whose flat
                            elements this rank's shards hold, [(lo, hi, values)]
                            (offsets into the tp-local tensor, flattened; the
                            float32 master values under bf16) and the same for
                            every optimizer state tensor; other state (step) whole
  rank{R}.pt                optional per-rank state (`rank_state`)
  meta.json                 optimizer param_groups and `extra`
  manifest.json             written last: config, layout, zero stage, every
                            file's sha256 and size, every serial tensor's full
                            shape and tp split (the serial names)
Loading (any layout, any zero stage, or a plain checkpoint into a ZeRO model)
assembles each tensor this rank needs from the fragments / parts that hold it
and keeps what the new layout puts on this rank. Any missing, truncated or
corrupt file raises MpiparError on every rank before anything changes; tensor
files are read with weights_only=True and metadata as JSON (no code runs).
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from ...errors import MpiparError
from .. import checkpoint_files as cf
from ..shards import assemble, take_shard

MANIFEST = cf.MANIFEST


def is_zero_checkpoint(path: str) -> bool:
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            return bool(json.load(f).get("zero"))
    except (OSError, ValueError):
        return False


def _fragments_of(model, optimizer):
    """{serial name: {"param": [(lo, hi, t)], "state": {key: [(lo, hi, t)] or value}}} of this rank."""
    specs = {id(s.param): s for s in model.specs()}
    out = {}
    for b in model.buckets.buckets:
        state = optimizer.state.get(b.master, {}) if optimizer is not None else {}
        for f in b.fragments:
            s = specs[id(b.params[f.index])]
            if not s.primary:
                continue
            entry = out.setdefault(s.name, {"param": [], "state": {}})
            entry["param"].append((f.lo, f.hi, b.master.detach()[f.shard_lo:f.shard_hi].cpu().clone()))
            for k, v in state.items():
                if torch.is_tensor(v) and v.shape == b.master.shape:
                    entry["state"].setdefault(k, []).append((f.lo, f.hi, v[f.shard_lo:f.shard_hi].cpu().clone()))
                else:
                    entry["state"][k] = v.cpu().clone() if torch.is_tensor(v) else v
    return out


def save(model, optimizer, path: str, ctx, extra=None, rank_state=None) -> str:
    """Collective over the model's mesh: each rank writes its shards (and `rank_state`) into a
    temporary folder, rank 0 the meta and the manifest, then renames it to `path`. `ctx` is
    checkpoint._Ctx's view of this rank, as for `load`."""
    mesh = model.mesh
    path = os.path.abspath(path)

    def prepare():
        meta = cf.meta_json(optimizer, extra)  # refused before anything is written
        tmp = cf.temp_name(path, "tmp")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.mkdir(tmp)
        return tmp, meta

    tmp, meta = ctx.on_root(f"checkpoint.save: cannot prepare {path}", prepare)
    c = mesh.coords
    name = f"zero-pp{c['pp']}-tp{c['tp']}-d{model.buckets.group.rank}.pt"
    report = {"file": name, "files": {}, "tensors": {
        s.name: {"shape": s.full_shape(), "dtype": str(s.param.dtype).replace("torch.", ""),
                 "dim": s.dim if s.sharded else None, "stride": s.stride, "parts": s.parts if s.sharded else 1,
                 "part": s.part if s.sharded else 0, "local_shape": list(s.param.shape)}
        for s in model.specs() if s.primary}}
    try:
        err = None
        try:
            report["files"][name] = cf.write_file(os.path.join(tmp, name),
                                                   cf.serialize(_fragments_of(model, optimizer)))
            if rank_state is not None:
                rank_file = f"rank{ctx.rank}.pt"
                report["files"][rank_file] = cf.write_file(os.path.join(tmp, rank_file), cf.serialize(rank_state))
                report["rank_file"] = rank_file
        except Exception as exc:  # noqa: BLE001 - reported on every rank
            err = f"checkpoint.save: writing {path} failed on this rank: {type(exc).__name__}: {exc}"
        ctx.agree(err)
        reports = ctx.gather(report)
        ctx.on_root(f"checkpoint.save: finishing {path} failed",
                    lambda: _finish(ctx, model.zero, tmp, path, meta, reports))
    except MpiparError:
        if ctx.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _finish(ctx, zero: int, tmp: str, path: str, meta: bytes, reports: list) -> None:
    """Rank 0: meta, the manifest last, then the folder goes into place (as the plain writer)."""
    files = {cf.META: cf.write_file(os.path.join(tmp, cf.META), meta)}
    merged: dict = {}
    rank_files = {}
    for rank, r in enumerate(reports):
        files.update(r["files"])
        if "rank_file" in r:
            rank_files[str(rank)] = r["rank_file"]
        for n, t in r["tensors"].items():
            e = merged.setdefault(n, {k: t[k] for k in ("shape", "dtype", "dim", "stride", "parts")})
            e.setdefault("local_shapes", {})[str(t["part"])] = t["local_shape"]
            e.setdefault("holders", {}).setdefault(str(t["part"]), []).append(r["file"])
    for e in merged.values():
        e["holders"] = {k: sorted(set(v)) for k, v in e["holders"].items()}
    manifest = {"format": cf.FORMAT, "version": cf.VERSION, "config": ctx.cfg.to_dict(), "layout": ctx.layout,
                "world_size": ctx.size, "zero": zero, "files": files, "tensors": merged, "rank_files": rank_files}
    cf.write_file(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())
    cf.fsync_dir(tmp)
    old = None
    if os.path.lexists(path):
        old = cf.temp_name(path, "old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    cf.fsync_dir(os.path.dirname(path))
    if old:
        shutil.rmtree(old, ignore_errors=True)


# ---- loading -----------------------------------------------------------------------------------
def _local_part(files: dict, holders: list, name: str, shape: list):
    """(tp-local parameter, its state) of one tp part, from the fragments of the ZeRO files."""
    numel = 1
    for n in shape:
        numel *= n
    param, state = None, {}
    for f in holders:
        entry = files[f].get(name)
        if entry is None:
            continue
        for lo, hi, t in entry["param"]:
            if param is None:
                param = torch.zeros(numel, dtype=t.dtype)
            param[lo:hi] = t
        for k, v in entry["state"].items():
            if isinstance(v, list):
                buf = state.setdefault(k, torch.zeros(numel, dtype=v[0][2].dtype))
                for lo, hi, t in v:
                    buf[lo:hi] = t
            else:
                state[k] = v
    if param is None:
        raise MpiparError(f"no fragment of {name} in {holders}")
    return param.view(shape), {k: (v.view(shape) if torch.is_tensor(v) and v.numel() == numel and v.dim() else v)
                               for k, v in state.items()}


def _full(name: str, entry: dict, files: dict, zero: bool):
    """(full serial tensor, its optimizer state: full tensors or plain values)."""
    if zero:
        parts = [_local_part(files, entry["holders"][str(r)], name, entry["local_shapes"][str(r)])
                 for r in range(entry["parts"])]
    else:
        parts = [(files[entry["files"][str(r)]]["params"][name], files[entry["files"][str(r)]]["optim"].get(name, {}))
                 for r in range(entry["parts"])]
    full = assemble([p for p, _ in parts], entry["dim"], entry["stride"])
    state = {}
    for k, v in parts[0][1].items():
        if torch.is_tensor(v) and v.dim() and v.shape == parts[0][0].shape:
            v = assemble([s[k] for _, s in parts], entry["dim"], entry["stride"])
        state[k] = v
    if list(full.shape) != list(entry["shape"]):
        raise MpiparError(f"{name}: assembled shape {list(full.shape)} != {entry['shape']}")
    return full, state


def load(model, optimizer, path: str, ctx):
    """Load `path` (ZeRO or plain checkpoint) into `model` (ZeRO or not); `ctx` is checkpoint._Ctx's
    view of this rank. Returns (the saved `extra`, this rank's `rank_state` or None: only on the
    same world size and layout)."""

    manifest, err = cf.read_manifest(path, model.cfg)
    ctx.agree(err)
    zero = bool(manifest.get("zero"))
    specs = list(ctx.specs)
    names = sorted({s.name for s in specs})
    missing = [n for n in names if n not in manifest["tensors"]]
    ctx.agree(f"checkpoint {path}: no tensor {missing[0]} in the manifest" if missing else None)
    meta_file = cf.META if manifest["version"] >= 2 else cf.LEGACY_META
    same_layout = manifest.get("world_size") == ctx.size and manifest.get("layout") == ctx.layout
    rank_file = manifest.get("rank_files", {}).get(str(ctx.rank)) if same_layout else None
    needed = {meta_file} | ({rank_file} if rank_file else set())
    for n in names:
        e = manifest["tensors"][n]
        needed |= {f for fs in e["holders"].values() for f in fs} if zero else set(e["files"].values())
    ctx.agree(next((e for e in (cf.verify(path, f, manifest["files"].get(f)) for f in sorted(needed)) if e), None))
    err, values, files = None, {}, {}
    try:
        for f in sorted(needed):
            files[f] = cf.read_meta_json(path, f) if f == cf.META else cf.torch_load(path, f)
        values = {n: _full(n, manifest["tensors"][n], files, zero) for n in names}
    except MpiparError as exc:
        err = str(exc)
    except Exception as exc:  # noqa: BLE001 - reported on every rank
        err = f"checkpoint {path}: cannot load: {type(exc).__name__}: {exc}"
    ctx.agree(err)
    local = {}
    for s in specs:
        full, state = values[s.name]
        dim = s.dim if s.sharded else None
        local[id(s.param)] = (take_shard(full, s.part, s.parts, dim, s.stride),
                              {k: take_shard(v, s.part, s.parts, dim, s.stride)
                               if torch.is_tensor(v) and v.dim() and v.shape == full.shape else v
                               for k, v in state.items()})
    with torch.no_grad():
        if getattr(model, "zero", 0):
            _apply_sharded(model, optimizer, local)
        else:
            for s in specs:
                param, state = local[id(s.param)]
                s.param.copy_(param)
                if optimizer is not None and state:
                    optimizer.state[s.param] = {k: v.to(s.param.device, s.param.dtype).clone()
                                                if torch.is_tensor(v) and v.shape == s.param.shape and v.dim()
                                                else v for k, v in state.items()}
    meta = files[meta_file]
    if optimizer is not None:
        for group, saved in zip(optimizer.param_groups, meta["param_groups"]):
            group.update({k: tuple(v) if isinstance(group.get(k), tuple) and isinstance(v, list) else v
                          for k, v in saved.items()})
    return meta["extra"], (files[rank_file] if rank_file else None)


def _apply_sharded(model, optimizer, local: dict) -> None:
    """Write full tp-local values into a ZeRO model's buckets: parameters, shards, masters, state."""
    buckets = model.buckets
    with buckets.gathered():
        for b in buckets.buckets:
            for p in b.params:
                p.copy_(local[id(p)][0])
            flat = torch.zeros(b.padded, dtype=b.master.dtype)
            states: dict = {}
            for p, off in zip(b.params, b.offsets):
                param, state = local[id(p)]
                flat[off:off + p.numel()] = param.reshape(-1).to(b.master.dtype)
                for k, v in state.items():
                    if torch.is_tensor(v) and v.dim() and v.shape == p.shape:
                        states.setdefault(k, torch.zeros(b.padded, dtype=v.dtype))[off:off + p.numel()] = v.reshape(-1)
                    else:
                        states[k] = v
            b.master.copy_(flat[b.lo:b.hi])
            if b.separate_master:
                b.shard.copy_(b.master)
            if optimizer is not None and states:
                optimizer.state[b.master] = {k: (v[b.lo:b.hi].to(b.master.device, b.master.dtype).clone()
                                                 if torch.is_tensor(v) and v.dim() and v.numel() == b.padded
                                                 else (v.clone() if torch.is_tensor(v) else v))
                                             for k, v in states.items()}
