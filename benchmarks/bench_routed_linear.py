"""Routed linear vs a dense F.linear over the same tokens, measured in one run, printed as ratios.

Backends: the torch reference (sparsify::routed_linear on CPU) and the papers' boolean-mask
loop (out = torch.empty; out[mask_m] = linear(x[mask_m], w[m])). Routing adds no FLOPs, so
1.0x is the floor. Usage: python benchmarks/bench_routed_linear.py [--tokens 8192 --d-in 1024 --d-out 2816]
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sparsify import ops


def mask_loop(x, ids, weight, bias):
    out = x.new_empty(x.shape[0], weight.shape[1])
    for m in range(weight.shape[0]):
        mask = ids == m
        out[mask] = F.linear(x[mask], weight[m], bias[m])
    return out


def timed(fn, repeats):
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--d-in", type=int, default=1024)
    parser.add_argument("--d-out", type=int, default=2816)
    parser.add_argument("--modalities", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, args.d_in, generator=g).to(device, dtype)
    ids = torch.randint(0, args.modalities, (args.tokens,), generator=g).to(device)
    weight = (torch.randn(args.modalities, args.d_out, args.d_in, generator=g) / args.d_in ** 0.5).to(device, dtype)
    bias = torch.randn(args.modalities, args.d_out, generator=g).to(device, dtype)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(fn):
        return timed(lambda: (fn(), sync()), args.repeats)

    with torch.no_grad():
        dense = run(lambda: F.linear(x, weight[0], bias[0]))
        results = {
            "routed_linear (torch reference)": run(lambda: ops.routed_linear(x, ids, weight, bias)),
            "boolean-mask loop (papers)": run(lambda: mask_loop(x, ids, weight, bias)),
        }
    print(f"{args.tokens} tokens x {args.d_in} -> {args.d_out}, {args.modalities} modalities, {args.dtype}, "
          f"{device}, {torch.get_num_threads()} threads; median of {args.repeats}")
    print(f"  dense F.linear                      {dense * 1e3:8.2f} ms   1.00x")
    for name, seconds in results.items():
        print(f"  {name:<35} {seconds * 1e3:8.2f} ms   {seconds / dense:.2f}x")


if __name__ == "__main__":
    main()
