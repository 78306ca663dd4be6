"""Routed ops vs the dense op over the same tokens, every backend present, one run, printed as ratios.

Backends: Triton (when a GPU is present), the torch reference (also with its rows already in
modality order, as inside a region the hoist pass sorted), and the papers'
boolean-mask loop (out = empty; out[mask_m] = op(x[mask_m], w[m])). Baselines are
dense F.linear / F.layer_norm of the same tokens with one weight: routing adds no
FLOPs, so 1.0x is the floor. Forward only by default; --backward times fwd+bwd.
Defaults: on GPU 16384 tokens x 4096 -> 11008 bf16 (the issue's target shape); on CPU
8192 x 1024 -> 2816 fp32.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sparsify.ops.backend import triton_available

CUDA = torch.cuda.is_available()


def mask_loop_linear(x, ids, weight, bias):
    out = x.new_empty(x.shape[0], weight.shape[1])
    for m in range(weight.shape[0]):
        mask = ids == m
        out[mask] = F.linear(x[mask], weight[m], bias[m])
    return out


def mask_loop_layer_norm(x, ids, weight, bias):
    out = torch.empty_like(x)
    for m in range(weight.shape[0]):
        mask = ids == m
        out[mask] = F.layer_norm(x[mask], x.shape[-1:], weight[m], bias[m])
    return out


def timed(fn, repeats, backward):
    def step():
        out = fn()
        if backward:
            out.backward(torch.ones_like(out))
        if CUDA:
            torch.cuda.synchronize()

    step()  # warm-up (and autotuning)
    step()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def report(title, dense_seconds, results):
    print(title)
    print(f"  {'dense':<34} {dense_seconds * 1e3:9.3f} ms   1.00x")
    for name, seconds in results.items():
        print(f"  {name:<34} {seconds * 1e3:9.3f} ms   {seconds / dense_seconds:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=16384 if CUDA else 8192)
    parser.add_argument("--d-in", type=int, default=4096 if CUDA else 1024)
    parser.add_argument("--d-out", type=int, default=11008 if CUDA else 2816)
    parser.add_argument("--modalities", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16" if CUDA else "float32",
                        choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=20 if CUDA else 3)
    parser.add_argument("--backward", action="store_true")
    args = parser.parse_args()
    device, dtype = ("cuda" if CUDA else "cpu"), getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device, dtype).requires_grad_(args.backward)

    x = rand(args.tokens, args.d_in)
    ids = torch.randint(0, args.modalities, (args.tokens,), generator=g).to(device)
    sorted_ids = ids.sort(stable=True).values
    weight, bias = rand(args.modalities, args.d_out, args.d_in, scale=args.d_in ** -0.5), rand(args.modalities, args.d_out)
    dense_w, dense_b = rand(args.d_out, args.d_in, scale=args.d_in ** -0.5), rand(args.d_out)
    backends = ["torch"] + (["triton"] if CUDA and triton_available() else [])
    print(f"{args.tokens} tokens, {args.modalities} modalities, {args.dtype}, {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if CUDA else f', {torch.get_num_threads()} threads'}, "
          f"{'fwd+bwd' if args.backward else 'fwd'}, median of {args.repeats}")

    context = torch.enable_grad() if args.backward else torch.no_grad()
    with context:
        dense = timed(lambda: F.linear(x, dense_w, dense_b), args.repeats, args.backward)
        results = {f"routed_linear ({b})": timed(lambda b=b: torch.ops.sparsify.routed_linear(x, ids, weight, bias, b),
                                                 args.repeats, args.backward) for b in backends}
        # Inside a hoisted region (passes/hoist.py) the rows arrive in modality order: no gather or scatter.
        results["routed_linear (torch), rows sorted"] = timed(
            lambda: torch.ops.sparsify.routed_linear(x, sorted_ids, weight, bias, "torch"), args.repeats, args.backward)
        results["boolean-mask loop (papers)"] = timed(lambda: mask_loop_linear(x, ids, weight, bias), args.repeats,
                                                      args.backward)
        report(f"linear {args.d_in} -> {args.d_out}", dense, results)

        ln_w, ln_b = rand(args.modalities, args.d_in), rand(args.modalities, args.d_in)
        dense = timed(lambda: F.layer_norm(x, (args.d_in,), ln_w[0], ln_b[0]), args.repeats, args.backward)
        results = {f"routed_layer_norm ({b})": timed(
            lambda b=b: torch.ops.sparsify.routed_layer_norm(x, ids, ln_w, ln_b, 1e-5, b), args.repeats, args.backward)
            for b in backends}
        results["boolean-mask loop (papers)"] = timed(lambda: mask_loop_layer_norm(x, ids, ln_w, ln_b), args.repeats,
                                                      args.backward)
        report(f"layer_norm {args.d_in}", dense, results)


if __name__ == "__main__":
    main()
