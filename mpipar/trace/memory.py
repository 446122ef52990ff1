"""Memory probes: process RSS, bytes autograd saved for backward, CUDA bytes.

`ActivationMeter` counts the live bytes of the tensors autograd saves for the
backward pass (the "activations"), through `torch.autograd.graph.saved_tensors_hooks`:

    meter = ActivationMeter()
    with meter:                   # ops run here have their saved tensors counted
        loss = model(x).sum()
    meter.current                 # bytes held for backward right now
    loss.backward()               # autograd frees its saved tensors ...
    meter.current                 # ... and the count drops back (here: 0)
    meter.peak                    # high-water mark since construction / reset_peak()

Bytes are counted per storage: two saved views of one tensor count once, and a
saved slice counts its whole storage (that is what stays alive). Parameters
(and views of them, like the `weight.t()` that nn.Linear saves) are skipped,
as are the storages of anything passed in `exclude` (modules or tensors).
"""
from __future__ import annotations

import os
import threading

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size of this process in bytes (from /proc/self/statm; 0 if unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):  # pragma: no cover - non-Linux
        try:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        except Exception:
            return 0


def device_bytes(device) -> tuple[int, int]:
    """(allocated, peak allocated) CUDA bytes of `device`; (0, 0) for CPU devices."""
    if device is None or torch.device(device).type != "cuda":
        return 0, 0
    return int(torch.cuda.memory_allocated(device)), int(torch.cuda.max_memory_allocated(device))


def _storage_key(t: torch.Tensor):
    """(key, nbytes) identifying the memory a tensor keeps alive."""
    try:
        s = t.untyped_storage()
        return (str(t.device), s.data_ptr()), int(s.nbytes())
    except (RuntimeError, NotImplementedError):  # sparse, nested, ... tensors
        return ("id", id(t)), int(t.numel() * t.element_size())


def _is_parameter(t: torch.Tensor) -> bool:
    base = t._base
    return isinstance(t, torch.nn.Parameter) or isinstance(base, torch.nn.Parameter)


class _Saved:
    """What autograd stores instead of the tensor; its deletion releases the bytes.

    Holds a detached alias (same storage, no grad_fn): holding the tensor
    itself would make a reference cycle for saved outputs (tensor -> grad_fn
    -> saved -> tensor) that only the garbage collector frees. Autograd
    re-attaches the metadata on unpacking, so detaching is allowed.
    """

    __slots__ = ("tensor", "meter", "key", "__weakref__")

    def __init__(self, tensor, meter, key):
        self.tensor, self.meter, self.key = tensor.detach(), meter, key

    def __del__(self):
        if self.key is not None:
            self.meter._release(self.key)


class ActivationMeter:
    """Live and peak bytes of tensors saved for backward while the meter is entered.

    Reusable and re-entrant (`with meter:` may nest); thread safe (autograd may
    free saved tensors on its own threads). Counts only what is saved inside
    the `with` block, but keeps tracking it after the block exits, until
    autograd frees it.
    """

    def __init__(self, exclude=()):
        self._lock = threading.RLock()
        self._live: dict = {}  # storage key -> [refcount, nbytes]
        self._hooks: list = []
        self._excluded: set = set()
        self.current = 0
        self.peak = 0
        # False: entering counts nothing (a Python hook per saved tensor costs a training step
        # several percent; a run meters the steps it does not time)
        self.enabled = True
        self.exclude(*(exclude if isinstance(exclude, (list, tuple, set)) else (exclude,)))

    def exclude(self, *objs) -> None:
        """Never count the storages of these tensors or of these modules' parameters and buffers."""
        for obj in objs:
            tensors = list(obj.parameters()) + list(obj.buffers()) if isinstance(obj, torch.nn.Module) else [obj]
            for t in tensors:
                self._excluded.add(_storage_key(t)[0])

    def reset_peak(self) -> None:
        """Start a new high-water mark from the current live bytes."""
        with self._lock:
            self.peak = self.current

    def _pack(self, t: torch.Tensor):
        if _is_parameter(t):
            return _Saved(t, self, None)
        key, nbytes = _storage_key(t)
        if key in self._excluded:
            return _Saved(t, self, None)
        with self._lock:
            entry = self._live.get(key)
            if entry is None:
                self._live[key] = [1, nbytes]
                self.current += nbytes
                self.peak = max(self.peak, self.current)
            else:
                entry[0] += 1
        return _Saved(t, self, key)

    @staticmethod
    def _unpack(saved: _Saved) -> torch.Tensor:
        return saved.tensor

    def _release(self, key) -> None:
        with self._lock:
            entry = self._live.get(key)
            if entry is None:  # pragma: no cover - defensive
                return
            entry[0] -= 1
            if entry[0] == 0:
                del self._live[key]
                self.current -= entry[1]

    def __enter__(self) -> "ActivationMeter":
        hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack) if self.enabled else None
        if hooks is not None:
            hooks.__enter__()
        self._hooks.append(hooks)
        return self

    def __exit__(self, *exc) -> None:
        hooks = self._hooks.pop()
        if hooks is not None:
            hooks.__exit__(*exc)

    def __repr__(self) -> str:
        return f"ActivationMeter(current={self.current}, peak={self.peak})"
