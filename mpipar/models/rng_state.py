"""Every random number generator a training step may use, captured and restored exactly.

    state = capture()      # torch (CPU and every CUDA device), numpy's global, Python's `random`
    restore(state)         # the next draws are the ones that followed `capture()`

The state holds only tensors, ints, floats and strings (no pickled objects),
so it goes into a checkpoint file that `torch.load(weights_only=True)` reads.
Plain torch: no MPI. Each rank captures its own generators (`checkpoint.save`'s
`rank_state`); a resume on the same layout gives each rank its own back.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def capture() -> dict:
    """The current state of torch's, numpy's and Python's global generators (and CUDA's if in use)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict) -> None:
    """Put back what `capture` returned (CUDA only where it was captured and is available)."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["internal"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), int(npy["pos"]),
                         int(npy["has_gauss"]), float(npy["cached"])))
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
