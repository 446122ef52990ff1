"""Sharded checkpoints that load into any layout, with checksums.

    save(model, optimizer, path, extra=None)   # collective over the model's mesh
    extra = load(model, optimizer, path)       # any other layout, or the serial model

A checkpoint is a directory:
  shard-pp{P}-tp{T}.pt  one per (pipeline stage, tensor-parallel rank), written by
                        the dp = sp = 0 rank of that coordinate: its local
                        parameters and optimizer state, under serial names
  meta.pt               optimizer hyperparameters (param_groups) and `extra`
  manifest.json         written last: config, layout, every file's sha256 and
                        size, and for every serial tensor its full shape, split
                        (dim, stride) and which file holds each part

Loading reads the manifest, checks the size and sha256 of every file this
rank needs (a missing, truncated or corrupt file raises MpiparError naming the
shard, on every rank), assembles each full tensor from its parts and keeps
this rank's shard for the NEW layout. Optimizer state tensors shaped like
their parameter are split like it; other state (AdamW's step) is copied.
A directory without a manifest is an incomplete save and is refused.
The serial model (no mesh) saves and loads without MPI.
"""
from __future__ import annotations

import hashlib
import io
import json
import os

import torch

from ..errors import MpiparError, agree
from .gpt import SerialGPT
from .shards import assemble, serial_specs, take_shard
from .zero import checkpoint as zero_checkpoint

FORMAT = "mpipar-gpt-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
META = "meta.pt"
CONFIG_KEYS = ("vocab_size", "seq_len", "hidden", "num_heads", "num_layers", "ffn_hidden", "tied")


class _Ctx:
    """This rank's view: specs, shard coordinates and the world communicator (None: serial)."""

    def __init__(self, model):
        self.serial = isinstance(model, SerialGPT)
        if self.serial:
            self.specs, self.comm, self.rank = serial_specs(model), None, 0
            self.coords, self.layout = {"pp": 0, "tp": 0, "dp": 0, "sp": 0}, {"tp": 1, "pp": 1, "sp": 1, "dp": 1}
        else:
            mesh = model.mesh
            self.specs, self.comm, self.rank = model.specs(), mesh.world.comm, mesh.world.rank
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

    def barrier(self) -> None:
        if self.comm is not None:
            self.comm.Barrier()

    def gather(self, obj):
        return [obj] if self.comm is None else self.comm.gather(obj, root=0)


def _write(path: str, obj) -> dict:
    """torch.save obj to path atomically; returns {"sha256", "bytes"} of what was written."""
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


def _state_of(optimizer, param) -> dict:
    if optimizer is None:
        return {}
    state = optimizer.state.get(param, {})
    return {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in state.items()}


def save(model, optimizer, path: str, extra: dict | None = None) -> None:
    """Write a sharded checkpoint of `model` (and `optimizer`, may be None) to directory `path`.

    Collective over the model's mesh. `extra` (picklable, e.g. {"step": 100}) is returned by `load`.
    """
    if getattr(model, "zero", 0):
        return zero_checkpoint.save(model, optimizer, path, extra)  # every rank writes its own shards
    ctx = _Ctx(model)
    err = None
    try:
        if ctx.rank == 0:
            os.makedirs(path, exist_ok=True)
            if os.path.exists(os.path.join(path, MANIFEST)):
                os.remove(os.path.join(path, MANIFEST))  # incomplete until the new manifest lands
    except OSError as exc:
        err = f"checkpoint.save: cannot prepare {path}: {exc}"
    ctx.agree(err)
    ctx.barrier()
    report, err = None, None
    if ctx.writer:
        try:
            report = _write_shard(ctx, optimizer, path)
        except Exception as exc:  # noqa: BLE001 - reported on every rank
            err = f"checkpoint.save: writing {ctx.shard_file} failed: {type(exc).__name__}: {exc}"
    ctx.agree(err)
    reports = ctx.gather(report)
    err = None
    if ctx.rank == 0:
        try:
            _write_manifest(ctx, optimizer, path, [r for r in reports if r is not None], extra)
        except Exception as exc:  # noqa: BLE001
            err = f"checkpoint.save: writing the manifest failed: {type(exc).__name__}: {exc}"
    ctx.agree(err)


def _write_shard(ctx: _Ctx, optimizer, path: str) -> dict:
    params, optim, tensors = {}, {}, {}
    for s in ctx.specs:
        if not s.primary:
            continue
        params[s.name] = s.param.detach().cpu().clone()
        optim[s.name] = _state_of(optimizer, s.param)
        tensors[s.name] = {"shape": s.full_shape(), "dtype": str(s.param.dtype).replace("torch.", ""),
                           "dim": s.dim if s.sharded else None, "stride": s.stride,
                           "part": s.part if s.sharded else 0, "parts": s.parts if s.sharded else 1}
    info = _write(os.path.join(path, ctx.shard_file), {"params": params, "optim": optim})
    return {"file": ctx.shard_file, "info": info, "tensors": tensors}


def _write_manifest(ctx: _Ctx, optimizer, path: str, reports: list, extra) -> None:
    groups = [] if optimizer is None else [{k: v for k, v in g.items() if k != "params"}
                                           for g in optimizer.param_groups]
    files = {META: _write(os.path.join(path, META), {"param_groups": groups, "extra": extra})}
    tensors: dict = {}
    for r in reports:
        files[r["file"]] = r["info"]
        for name, t in r["tensors"].items():
            entry = tensors.setdefault(name, {k: t[k] for k in ("shape", "dtype", "dim", "stride", "parts")})
            entry.setdefault("files", {})[str(t["part"])] = r["file"]
    manifest = {"format": FORMAT, "version": VERSION, "config": ctx.cfg.to_dict(), "layout": ctx.layout,
                "files": files, "tensors": tensors}
    tmp = os.path.join(path, f".{MANIFEST}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, MANIFEST))


def load(model, optimizer, path: str):
    """Load the checkpoint in `path` into `model` (any layout) and `optimizer` (may be None).

    Collective over the model's mesh. Returns the `extra` given to `save`.
    Raises MpiparError on every rank, before changing anything, if the
    checkpoint is incomplete, a shard is missing, truncated or corrupt, or it
    belongs to a different model shape.
    """
    ctx = _Ctx(model)
    if getattr(model, "zero", 0) or zero_checkpoint.is_zero_checkpoint(path):
        return zero_checkpoint.load(model, optimizer, path, ctx)
    manifest, err = _read_manifest(path, ctx.cfg)
    ctx.agree(err)
    names = {s.name for s in ctx.specs}
    missing = sorted(names - set(manifest["tensors"]))
    ctx.agree(f"checkpoint {path}: no tensor {missing[0]} in the manifest" if missing else None)
    needed = {META} | {f for n in names for f in manifest["tensors"][n]["files"].values()}
    err = next((e for e in (_verify(path, f, manifest["files"].get(f)) for f in sorted(needed)) if e), None)
    ctx.agree(err)
    files, err = {}, None
    try:
        for f in sorted(needed):
            files[f] = torch.load(os.path.join(path, f), map_location="cpu", weights_only=f != META)
        values = [_local_values(s, manifest["tensors"][s.name], files) for s in ctx.specs]
        if optimizer is not None and len(files[META]["param_groups"]) not in (0, len(optimizer.param_groups)):
            raise MpiparError(f"the checkpoint has {len(files[META]['param_groups'])} optimizer param groups, "
                              f"the optimizer {len(optimizer.param_groups)}")
    except Exception as exc:  # noqa: BLE001 - reported on every rank
        err = f"checkpoint {path}: cannot load: {type(exc).__name__}: {exc}"
    ctx.agree(err)
    with torch.no_grad():
        for s, (param, state) in zip(ctx.specs, values):
            s.param.copy_(param)
            if optimizer is not None and state:
                optimizer.state[s.param] = {k: _placed(v, s.param) for k, v in state.items()}
    if optimizer is not None:
        for group, saved in zip(optimizer.param_groups, files[META]["param_groups"]):
            group.update(saved)
    return files[META]["extra"]


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
        with open(file) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        return None, f"checkpoint {path}: unreadable {MANIFEST}: {exc}"
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        return None, f"checkpoint {path}: not an {FORMAT} v{VERSION} manifest"
    saved, mine = manifest["config"], cfg.to_dict()
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
