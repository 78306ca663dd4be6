"""Routed ops on DTensors split along their feature dims (tensor parallelism's column-wise then row-wise pair),
2 gloo processes, against one process: forward and every gradient, each rank holding half of each routed
weight's features and all of its modalities. fp32; observed error ~1e-6 relative."""
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

M, N, K, TOKENS = 3, 8, 6, 10


def _inputs():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, K, generator=generator)
    ids = torch.randint(0, M, (TOKENS,), generator=generator)
    w_in, b_in = torch.randn(M, N, K, generator=generator), torch.randn(M, N, generator=generator)
    w_out, b_out = torch.randn(M, K, N, generator=generator), torch.randn(M, K, generator=generator)
    order = torch.randperm(TOKENS, generator=generator)
    return x, ids, w_in, b_in, w_out, b_out, order


def _block(x, ids, w_in, b_in, w_out, b_out, order):
    """Rows into a new order (as a hoisted block), column-wise routed linear, activation, row-wise one."""
    inverse = torch.argsort(order)
    rows = torch.ops.sparsify.permute_rows(x, order, inverse)
    row_ids = ids[order]
    hidden = torch.ops.sparsify.routed_linear(rows, row_ids, w_in, b_in).relu()
    return torch.ops.sparsify.routed_linear(hidden, row_ids, w_out, b_out)


def _worker(rank, world, directory):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    import sparsify.tensor_parallel  # noqa: F401  (the routed ops' sharding rules)

    dist.init_process_group("gloo", init_method=f"file://{directory}/init", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        x, ids, w_in, b_in, w_out, b_out, order = _inputs()
        reference = [t.clone().requires_grad_() for t in (x, w_in, b_in, w_out, b_out)]
        want = _block(reference[0], ids, *reference[1:3], *reference[3:], order)
        want.square().sum().backward()

        placements = [[Replicate()], [Shard(1)], [Shard(1)], [Shard(2)], [Replicate()]]
        sharded = [distribute_tensor(t, mesh, p).requires_grad_() for t, p in zip((x, w_in, b_in, w_out, b_out),
                                                                                   placements)]
        replicated = [distribute_tensor(t, mesh, [Replicate()]) for t in (ids, order)]
        got = _block(sharded[0], replicated[0], *sharded[1:3], *sharded[3:], replicated[1])
        assert isinstance(got, DTensor)
        torch.testing.assert_close(got.full_tensor(), want.detach(), rtol=1e-5, atol=1e-5)
        got.square().sum().backward()
        # each rank holds every modality's copy, half of its features
        assert tuple(sharded[1].to_local().shape) == (M, N // world, K)
        assert tuple(sharded[3].to_local().shape) == (M, K, N // world)
        for name, ours, theirs in zip(("x", "w_in", "b_in", "w_out", "b_out"), sharded, reference):
            if name != "x":  # a weight's gradient is sharded as the weight (x's is a partial sum: reduced below)
                assert ours.grad.placements == ours.placements, (name, ours.grad.placements)
            torch.testing.assert_close(ours.grad.full_tensor(), theirs.grad, rtol=1e-5, atol=1e-4, msg=name)
    finally:
        dist.destroy_process_group()


def test_column_then_row_wise_routed_linears_equal_one_process():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, tmp), nprocs=2, join=True)
