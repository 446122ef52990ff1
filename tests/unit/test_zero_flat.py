"""FlatBucket (ZeRO's flat layout): the shards of d ranks cover every parameter element once,
padding is zeros, parameters are views into the flat buffer, masters share or copy the shard."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mpipar.errors import MpiparError
from mpipar.models.zero.flat import FlatBucket


def params(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(*s, generator=g).to(dtype)) for s in ((3, 4), (5,), (2, 2, 2))]


@pytest.mark.parametrize("d", [1, 2, 3, 4, 7])
def test_shards_cover_every_element_once(d):
    originals = [p.detach().clone() for p in params()]
    covered = [torch.zeros(p.numel(), dtype=torch.int64) for p in originals]
    for r in range(d):
        ps = params()
        b = FlatBucket(ps, 0, d, r)
        assert b.padded % d == 0 and b.padded - b.numel < d and b.shard.numel() == b.padded // d
        assert all(torch.equal(p, o) for p, o in zip(ps, originals))   # values kept, now views of b.full
        assert all(p.untyped_storage().data_ptr() == b.full.untyped_storage().data_ptr() for p in ps)
        assert torch.all(b.full[b.numel:] == 0)
        for f in b.fragments:
            covered[f.index][f.lo:f.hi] += 1
            assert torch.equal(b.shard[f.shard_lo:f.shard_hi], originals[f.index].reshape(-1)[f.lo:f.hi])
    assert all(torch.all(c == 1) for c in covered)


def test_masters_share_fp64_shards_and_copy_bf16_ones():
    b = FlatBucket(params(), 0, 2, 1)
    assert b.master.untyped_storage().data_ptr() == b.full.untyped_storage().data_ptr() and not b.separate_master
    h = FlatBucket(params(torch.bfloat16), 0, 2, 1)
    assert h.master.dtype == torch.float32 and h.separate_master
    assert torch.equal(h.master.detach().to(torch.bfloat16), h.shard)


def test_zero3_shard_survives_release_of_the_full_buffer():
    ps = params()
    b = FlatBucket(ps, 0, 2, 0, keep_full=False)
    shard = b.shard.clone()
    b.release_full()
    assert b.full.untyped_storage().nbytes() == 0 and ps[0].untyped_storage().nbytes() == 0
    assert torch.equal(b.shard, shard) and ps[0].shape == (3, 4)
    b.allocate_full()
    assert b.full.untyped_storage().nbytes() == b.padded * 8


def test_mixed_dtypes_refused():
    with pytest.raises(MpiparError, match="share a dtype"):
        FlatBucket([nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, dtype=torch.float64))], 0, 2, 0)
