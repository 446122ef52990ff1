"""Checkpoints of ZeRO models: every rank writes its own shards, nothing is gathered.

`models.save` / `models.load` come here for a model with zero >= 1 and for a
checkpoint written by one. A ZeRO checkpoint is a directory:
  zero-pp{P}-tp{T}-d{R}.pt  one per rank: for every serial tensor whose flat
                            elements this rank's shards hold, [(lo, hi, values)]
                            (offsets into the tp-local tensor, flattened; the
                            float32 master values under bf16) and the same for
                            every optimizer state tensor; other state (step) whole
  meta.pt                   optimizer param_groups and `extra`
  manifest.json             written last: config, layout, zero stage, every
                            file's sha256 and size, every serial tensor's full
                            shape and tp split (the serial names)
Loading (any layout, any zero stage, or a plain checkpoint into a ZeRO model)
assembles each tensor this rank needs from the fragments / parts that hold it
and keeps what the new layout puts on this rank. Any missing, truncated or
corrupt file raises MpiparError on every rank before anything changes.
"""
from __future__ import annotations

import hashlib
import io
import json
import os

import torch

from ...errors import MpiparError, agree
from ..checkpoint_files import torch_load
from ..shards import assemble, take_shard

FORMAT, VERSION, MANIFEST, META = "mpipar-gpt-checkpoint", 1, "manifest.json", "meta.pt"


def is_zero_checkpoint(path: str) -> bool:
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            return bool(json.load(f).get("zero"))
    except (OSError, ValueError):
        return False


def _write(path: str, obj) -> dict:
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


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


def save(model, optimizer, path: str, extra=None) -> None:
    """Collective over the model's mesh: each rank writes its shards; rank 0 the manifest."""
    mesh, world = model.mesh, model.mesh.world.comm
    err = None
    if world.rank == 0:
        try:
            os.makedirs(path, exist_ok=True)
            if os.path.exists(os.path.join(path, MANIFEST)):
                os.remove(os.path.join(path, MANIFEST))
        except OSError as exc:
            err = f"checkpoint.save: cannot prepare {path}: {exc}"
    agree(world, err)
    world.Barrier()
    c = mesh.coords
    name = f"zero-pp{c['pp']}-tp{c['tp']}-d{model.buckets.group.rank}.pt"
    tensors = {s.name: {"shape": s.full_shape(), "dtype": str(s.param.dtype).replace("torch.", ""),
                        "dim": s.dim if s.sharded else None, "stride": s.stride, "parts": s.parts if s.sharded else 1,
                        "part": s.part if s.sharded else 0, "local_shape": list(s.param.shape)}
               for s in model.specs() if s.primary}
    report, err = None, None
    try:
        info = _write(os.path.join(path, name), _fragments_of(model, optimizer))
        report = {"file": name, "info": info, "tensors": tensors}
    except Exception as exc:  # noqa: BLE001 - reported on every rank
        err = f"checkpoint.save: writing {name} failed: {type(exc).__name__}: {exc}"
    agree(world, err)
    reports = world.gather(report, root=0)
    err = None
    if world.rank == 0:
        try:
            groups = [] if optimizer is None else [{k: v for k, v in g.items() if k != "params"}
                                                   for g in optimizer.param_groups]
            files = {META: _write(os.path.join(path, META), {"param_groups": groups, "extra": extra})}
            merged: dict = {}
            for r in reports:
                files[r["file"]] = r["info"]
                for n, t in r["tensors"].items():
                    e = merged.setdefault(n, {k: t[k] for k in ("shape", "dtype", "dim", "stride", "parts")})
                    e.setdefault("local_shapes", {})[str(t["part"])] = t["local_shape"]
                    e.setdefault("holders", {}).setdefault(str(t["part"]), []).append(r["file"])
            for e in merged.values():  # only files that really hold fragments of the tensor are listed
                e["holders"] = {k: sorted(set(v)) for k, v in e["holders"].items()}
            manifest = {"format": FORMAT, "version": VERSION, "config": model.cfg.to_dict(),
                        "layout": dict(mesh.shape), "zero": model.zero, "files": files, "tensors": merged}
            tmp = os.path.join(path, f".{MANIFEST}.tmp{os.getpid()}")
            with open(tmp, "w") as f:
                json.dump(manifest, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(path, MANIFEST))
        except Exception as exc:  # noqa: BLE001
            err = f"checkpoint.save: writing the manifest failed: {type(exc).__name__}: {exc}"
    agree(world, err)


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


def _verify(path: str, name: str, info) -> str | None:
    file = os.path.join(path, name)
    if info is None:
        return f"checkpoint {path}: shard {name} is not listed in the manifest"
    if not os.path.isfile(file):
        return f"checkpoint {path}: shard {name} is missing"
    if os.path.getsize(file) != info["bytes"]:
        return f"checkpoint {path}: shard {name} is truncated or altered"
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return None if digest.hexdigest() == info["sha256"] else f"checkpoint {path}: shard {name} is corrupt"


def load(model, optimizer, path: str, ctx):
    """Load `path` (ZeRO or plain checkpoint) into `model` (ZeRO or not); `ctx` is checkpoint._Ctx's
    view of this rank (specs, agree). Returns the saved `extra`."""
    err, manifest = None, None
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
        if manifest.get("format") != FORMAT or manifest.get("version") not in (VERSION, 2):
            err = f"checkpoint {path}: not an {FORMAT} manifest of version 1 or 2"
        else:
            diff = [k for k in ("vocab_size", "seq_len", "hidden", "num_heads", "num_layers", "ffn_hidden", "tied")
                    if manifest["config"].get(k) != model.cfg.to_dict()[k]]
            err = f"checkpoint {path}: model shape differs: {diff}" if diff else None
    except (OSError, ValueError) as exc:
        err = f"checkpoint {path}: no readable {MANIFEST} (missing directory or an incomplete save): {exc}"
    ctx.agree(err)
    zero = bool(manifest.get("zero"))
    specs = [s for s in ctx.specs]
    names = sorted({s.name for s in specs})
    missing = [n for n in names if n not in manifest["tensors"]]
    ctx.agree(f"checkpoint {path}: no tensor {missing[0]} in the manifest" if missing else None)
    meta_file = "meta.json" if manifest["version"] >= 2 else META  # plain checkpoints since version 2
    needed = {meta_file}
    for n in names:
        e = manifest["tensors"][n]
        needed |= {f for fs in e["holders"].values() for f in fs} if zero else set(e["files"].values())
    ctx.agree(next((e for e in (_verify(path, f, manifest["files"].get(f)) for f in sorted(needed)) if e), None))
    err, values = None, {}
    try:
        files = {f: torch_load(path, f) for f in needed if f != "meta.json"}  # weights only: no code runs
        if meta_file == "meta.json":
            with open(os.path.join(path, meta_file)) as f:
                files[meta_file] = json.load(f)
        values = {n: _full(n, manifest["tensors"][n], files, zero) for n in names}
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
            group.update(saved)
    return meta["extra"]


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
