"""How DTensor shards the routed ops: the first piece of tensor parallelism (issue 29).

A routed linear's stacked weight [M, N, K] is split along its feature dims, never the modality dim, as
Megatron splits a dense one: column-wise (N: weight Shard(1), bias Shard(1), input replicated, output
sharded on its last dim) or row-wise (K: weight Shard(2), input sharded on its last dim, output a partial
sum; the bias is handed in as a partial value so that it is added once). Registered with DTensor's own
`register_sharding`, so a routed op called on DTensors (eager, under autograd) runs on each rank's shard and
DTensor inserts the collectives; its backward op has the matching rules (column-wise: dx partial, dW and
db sharded; row-wise: dx sharded, dW sharded, db replicated). `permute_rows` (the hoisted blocks' row
order) keeps any placement but the rows' own dim. Every rule also lists "all replicated", so an op whose
inputs come sharded some other way is redistributed rather than refused.

What is not done yet: running a whole routed model this way. Its graphs hold the dense model's view sizes
(heads as constants), plain tensors made inside the graph (masks, positions) meet DTensors in forward and in
backward, and some views of head-sharded attention outputs are not views of their local shards; see the
closing notes of issue 29.
"""
from __future__ import annotations

import torch
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

import sparsify.ops  # noqa: F401  (defines the custom ops registered below)

REPLICATE = Replicate()


def _optional(placement, tensor):
    return None if tensor is None else placement


@register_sharding(torch.ops.sparsify.routed_linear.default)
def routed_linear_sharding(x, modality_ids, weight, bias=None, backend="auto"):
    last = x.ndim - 1
    return [
        ([REPLICATE], [REPLICATE, REPLICATE, REPLICATE, _optional(REPLICATE, bias), None]),
        ([Shard(last)], [REPLICATE, REPLICATE, Shard(1), _optional(Shard(1), bias), None]),          # column-wise
        ([Partial()], [Shard(last), REPLICATE, Shard(2), _optional(Partial(), bias), None]),         # row-wise
    ]


@register_sharding(torch.ops.sparsify.routed_linear_backward.default)
def routed_linear_backward_sharding(grad, x, modality_ids, weight, has_bias, backend="auto", frozen=None):
    last = x.ndim - 1
    rest = [None, None, None]  # has_bias, backend, frozen
    return [
        ([REPLICATE, REPLICATE, REPLICATE], [REPLICATE, REPLICATE, REPLICATE, REPLICATE, *rest]),
        # column-wise: each rank's output columns give a partial dx, its own rows of dW and db
        ([Partial(), Shard(1), Shard(1) if has_bias else REPLICATE],
         [Shard(grad.ndim - 1), REPLICATE, REPLICATE, Shard(1), *rest]),
        # row-wise: each rank's input columns give its columns of dx and of dW; db from the whole grad
        ([Shard(last), Shard(2), REPLICATE], [REPLICATE, Shard(last), REPLICATE, Shard(2), *rest]),
    ]


@register_sharding(torch.ops.sparsify.permute_rows.default)
def permute_rows_sharding(rows, order, inverse):
    # a permutation of dim 0 (the rows): linear, and blind to how the other dims are split
    return [([REPLICATE], [REPLICATE, REPLICATE, REPLICATE]), ([Partial()], [Partial(), REPLICATE, REPLICATE])] + [
        ([Shard(dim)], [Shard(dim), REPLICATE, REPLICATE]) for dim in range(1, rows.ndim)]
