"""mpipar.models.rng_state: the draws after restore() are those that followed capture(), for every generator."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from mpipar.models import rng_state


def draws():
    return (torch.rand(5).tolist(), torch.randn(3).tolist(), np.random.rand(4).tolist(), np.random.randn(3).tolist(),
            [random.random() for _ in range(3)], random.gauss(0, 1))


def test_restore_repeats_every_generator_and_survives_weights_only_load():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    draws()
    np.random.randn(1)  # leaves a cached gaussian in numpy's state
    random.gauss(0, 1)  # and in Python's
    state = rng_state.capture()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)  # plain data only: no pickled objects
    first = draws()
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    assert draws() != first
    rng_state.restore(loaded)
    assert draws() == first


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_generator_restored():
    torch.cuda.manual_seed_all(4)
    torch.rand(2, device="cuda")
    state = rng_state.capture()
    first = torch.rand(3, device="cuda").tolist()
    rng_state.restore(state)
    assert torch.rand(3, device="cuda").tolist() == first
