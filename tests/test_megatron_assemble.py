"""The universal path's HF-tensor assembly merges regular runs (Q/K/V rows of every query group)
into one strided copy: it must produce exactly what one copy per piece produces."""
from __future__ import annotations

import torch

from genbackends_megatron.plan import Piece
from genbackends_megatron.source import _merged_runs


def test_merged_runs_equal_one_copy_per_piece():
    g = torch.Generator().manual_seed(0)
    groups, q, hd, hidden = 4, 3, 8, 16  # Megatron linear_qkv rows: per group [q*hd | hd | hd]
    shard = torch.randn(groups * (q + 2) * hd, hidden, generator=g)
    key = ((0, 0, 0), "decoder.layers.0.self_attention.linear_qkv.weight")
    stride = (q + 2) * hd
    pieces = {
        "q": [Piece(key, ("q",), 0, gi * stride, gi * q * hd, q * hd) for gi in range(groups)],
        "k": [Piece(key, ("k",), 0, gi * stride + q * hd, gi * hd, hd) for gi in range(groups)],
        "v": [Piece(key, ("v",), 0, gi * stride + (q + 1) * hd, gi * hd, hd) for gi in range(groups)],
    }
    for name, ps in pieces.items():
        rows = sum(p.length for p in ps)
        merged = torch.full((rows, hidden), float("nan"))
        pairs = _merged_runs(merged, list(reversed(ps)), {key: shard})
        assert len(pairs) == 1  # one strided copy for all groups
        for d, s in pairs:
            d.copy_(s)
        naive = torch.full((rows, hidden), float("nan"))
        for p in ps:
            naive.narrow(0, p.dst_lo, p.length).copy_(shard.narrow(0, p.src_lo, p.length))
        assert torch.equal(merged, naive), name
    # irregular pieces are copied one by one
    odd = [Piece(key, ("x",), 0, 0, 0, 5), Piece(key, ("x",), 0, 9, 5, 3)]
    out = torch.zeros(8, hidden)
    pairs = _merged_runs(out, odd, {key: shard})
    assert len(pairs) == 2
