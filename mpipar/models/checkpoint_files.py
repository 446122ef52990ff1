"""The files of a checkpoint: atomic folders, step folders, checksums, and loaders that run no code.

A checkpoint is a folder:
  shard-pp{P}-tp{T}.pt  one per (pipeline stage, tensor-parallel rank), written by
                        the dp = sp = 0 rank of that coordinate: its local
                        parameters and optimizer state, under serial names
  rank{R}.pt            optional per-rank state (`rank_state`, e.g. RNG states)
  meta.json             optimizer hyperparameters (param_groups) and `extra` (JSON)
  manifest.json         written last: config, layout, world size, every file's
                        sha256 and size, and for every serial tensor its full
                        shape, split (dim, stride) and which file holds each part

    write_file(path, data)        write + fsync; returns {"sha256", "bytes"} for the manifest
    temp_name(path, "tmp"|"old")  .<name>.<kind>-<host>-<pid> next to `path` (hidden, per writer)
    step_path(run_dir, step)      run_dir/step-NNNNNN
    steps(run_dir), latest(run_dir)   complete step folders (those with a manifest), newest last
    clean_leftovers(run_dir)      remove the temporary folders of killed writers on this host
    verify(path, name, info)      None, or why the file differs from its manifest entry
    torch_load(path, name)        torch.load(weights_only=True); a pickle payload -> MpiparError
    read_meta_json(path, name)    the JSON metadata file
    read_manifest(path, cfg)      (manifest, None) or (None, why it cannot be used)
    local_values(spec, entry, files)  this rank's shard of a tensor (and its optimizer state), any layout

No MPI here: mpipar.models.checkpoint agrees on every outcome across ranks.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import socket

import torch

from ..errors import MpiparError
from .shards import assemble, take_shard

FORMAT = "mpipar-gpt-checkpoint"
VERSION = 2
VERSIONS = (1, 2)  # version 1 kept its metadata in meta.pt (read here with weights_only=True)
MANIFEST = "manifest.json"
META = "meta.json"
LEGACY_META = "meta.pt"
CONFIG_KEYS = ("vocab_size", "seq_len", "hidden", "num_heads", "num_layers", "ffn_hidden", "tied", "arch",
               "num_kv_heads")
STEP = re.compile(r"^step-(\d+)$")
LEFTOVER = re.compile(r"^\.(step-\d+)\.(tmp|old)-(.+)-(\d+)$")


def write_file(path: str, data: bytes) -> dict:
    """Write and fsync `data` to `path` (inside the temporary folder); {"sha256", "bytes"}."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: str, kind: str) -> str:
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.{kind}-{socket.gethostname()}-{os.getpid()}")


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


def torch_load(path: str, name: str):
    """torch.load with weights_only=True: tensors and plain containers only; a payload is refused."""
    try:
        return torch.load(os.path.join(path, name), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ""
        raise MpiparError(f"checkpoint {path}: file {name} holds objects other than tensors and plain "
                          f"data (a pickle payload?); refused, loading never runs code ({first})") from None


def read_meta_json(path: str, name: str) -> dict:
    try:
        with open(os.path.join(path, name), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise MpiparError(f"checkpoint {path}: file {name} is not readable JSON: {exc}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("param_groups"), list):
        raise MpiparError(f"checkpoint {path}: file {name} has no param_groups list")
    return meta


def verify(path: str, name: str, info) -> str | None:
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


def serialize(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def state_of(optimizer, param) -> dict:
    if optimizer is None:
        return {}
    state = optimizer.state.get(param, {})
    return {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in state.items()}


def meta_json(optimizer, extra) -> bytes:
    groups = [] if optimizer is None else [{k: v for k, v in g.items() if k != "params"}
                                           for g in optimizer.param_groups]
    try:
        return json.dumps({"param_groups": groups, "extra": extra}, indent=1, sort_keys=True).encode()
    except (TypeError, ValueError) as exc:
        raise MpiparError(f"checkpoint extra and optimizer hyperparameters must be JSON "
                          f"(numbers, strings, lists, dicts): {exc}") from None


def placed(value, param):
    """Optimizer state shaped like its parameter goes to its device and dtype; the rest stays."""
    if torch.is_tensor(value) and value.shape == param.shape and value.dim():
        return value.to(device=param.device, dtype=param.dtype)
    return value


def read_manifest(path: str, cfg):
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


def local_values(spec, entry: dict, files: dict):
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
