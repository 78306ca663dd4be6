"""Routed ops vs the dense op over the same tokens, every backend present, one run, printed as ratios.

Backends: Triton (when a GPU is present), the torch reference (on ids drawn per token; with its
rows already in modality order, as inside a region the hoist pass sorted; and on spans of one
modality, as multi-modal documents hold them), and the papers' boolean-mask loop
(out = empty; out[mask_m] = op(x[mask_m], w[m])). Dense and routed take turns within each
repeat (benchmarks/_interleaved.py). Baselines are dense F.linear / F.layer_norm of the same
tokens with one weight: routing adds no FLOPs, so 1.0x is the floor. Forward only by default; --backward times fwd+bwd.
Defaults: on GPU 16384 tokens x 4096 -> 11008 bf16 (the issue's target shape); on CPU
8192 x 1024 -> 2816 fp32.
"""
import argparse

import torch
import torch.nn.functional as F

from sparsify.ops.backend import triton_available
from sparsify.ops.routed_linear import routed_linear_direct

from _interleaved import interleaved

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


def stepper(fn, backward):
    """One timed call: the op, and its backward when timing fwd+bwd."""
    def step():
        out = fn()
        if backward:
            out.backward(torch.ones_like(out))
    return step


def report(title, timings):
    """Median time of each run and its time over dense's, the median of the paired ratios (quartiles)."""
    print(title)
    for name in timings.samples:
        print(f"  {name:<34} {timings.median(name) * 1e3:9.3f} ms   {timings.ratio(name, 'dense')}")


def few_rows(args, device, dtype, g):
    """A decoding step's linears: a few rows (one per sequence) through each of --layers distinct weights, so the
    weights come from memory as a model's do, not from cache. Dense F.linear (X @ W^T) against the routed op's
    reference, called directly as decode graphs call it (passes/direct_calls.py), on rows of one modality and on
    rows of modality r % M; and dense computed as W @ X^T, the form the reference uses for 2-16 rows, which shows
    what of the ratio is that GEMM form rather than routing."""
    dense_w = [(args.d_in ** -0.5 * torch.randn(args.d_out, args.d_in, generator=g)).to(device, dtype)
               for _ in range(args.layers)]
    routed_w = [(args.d_in ** -0.5 * torch.randn(args.modalities, args.d_out, args.d_in, generator=g)).to(device, dtype)
                for _ in range(args.layers)]
    print(f"few rows: {args.layers} distinct weights {args.d_in} -> {args.d_out} ({args.modalities} modalities "
          f"routed), times per weight")
    for rows in (1, 2, 4, 8, 16):
        x = torch.randn(rows, args.d_in, generator=g).to(device, dtype)
        one, mixed = torch.ones(rows, dtype=torch.long), torch.arange(rows) % args.modalities
        runs = {
            "dense": lambda: [F.linear(x, w) for w in dense_w],
            "dense as W @ X^T": lambda: [torch.mm(w, x.t()).t().contiguous() for w in dense_w],
            "routed, one modality": lambda: [routed_linear_direct(x, one, w) for w in routed_w],
            "routed, modality r % M": lambda: [routed_linear_direct(x, mixed, w) for w in routed_w],
        }
        timings = interleaved(runs, args.repeats)
        print(f"  {rows} rows")
        for name in timings.samples:
            print(f"    {name:<32} {timings.median(name) / args.layers * 1e6:9.1f} us   {timings.ratio(name, 'dense')}")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=16384 if CUDA else 8192)
    parser.add_argument("--d-in", type=int, help="default 4096 on GPU, 1024 on CPU, 256 with --few-rows")
    parser.add_argument("--d-out", type=int, help="default 11008 on GPU, 2816 on CPU, 704 with --few-rows")
    parser.add_argument("--modalities", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16" if CUDA else "float32",
                        choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=20 if CUDA else 9)
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--few-rows", action="store_true",
                        help="only a decoding step's linears: 1-16 rows through --layers distinct weights "
                             "(default d 256 -> 704, as bench_generate.py's Llama)")
    parser.add_argument("--layers", type=int, default=28)
    args = parser.parse_args()
    default_d = (256, 704) if args.few_rows else (4096, 11008) if CUDA else (1024, 2816)
    args.d_in, args.d_out = args.d_in or default_d[0], args.d_out or default_d[1]
    device, dtype = ("cuda" if CUDA else "cpu"), getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    if args.few_rows:
        with torch.no_grad():
            few_rows(args, device, dtype, g)
        return

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device, dtype).requires_grad_(args.backward)

    x = rand(args.tokens, args.d_in)
    ids = torch.randint(0, args.modalities, (args.tokens,), generator=g).to(device)
    sorted_ids = ids.sort(stable=True).values
    # Multi-modal documents hold each modality in spans (a caption, then an image's tokens): spans of 64-1024
    # tokens cycling through the modalities, which the reference computes in place, one GEMM per span.
    span_lengths = torch.randint(64, 1025, (args.tokens // 64 + 1,), generator=g)
    span_ids = torch.repeat_interleave(torch.arange(span_lengths.numel()) % args.modalities,
                                       span_lengths)[:args.tokens].to(device)
    weight, bias = rand(args.modalities, args.d_out, args.d_in, scale=args.d_in ** -0.5), rand(args.modalities, args.d_out)
    dense_w, dense_b = rand(args.d_out, args.d_in, scale=args.d_in ** -0.5), rand(args.d_out)
    backends = ["torch"] + (["triton"] if CUDA and triton_available() else [])
    print(f"{args.tokens} tokens, {args.modalities} modalities, {args.dtype}, {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if CUDA else f', {torch.get_num_threads()} threads'}, "
          f"{'fwd+bwd' if args.backward else 'fwd'}, {args.repeats} repeats, ratios: median of the paired "
          "ratios to dense (quartiles)")

    def timed(runs):  # dense and every routed variant take turns within each repeat (benchmarks/_interleaved.py)
        steps = {name: stepper(fn, args.backward) for name, fn in runs.items()}
        return interleaved(steps, args.repeats, torch.cuda.synchronize if CUDA else None)

    context = torch.enable_grad() if args.backward else torch.no_grad()
    with context:
        runs = {"dense": lambda: F.linear(x, dense_w, dense_b)}
        runs.update({f"routed_linear ({b})": (lambda b=b: torch.ops.sparsify.routed_linear(x, ids, weight, bias, b))
                     for b in backends})
        # Inside a hoisted region (passes/hoist.py) the rows arrive in modality order: no gather or scatter.
        runs["routed_linear (torch), rows sorted"] = \
            lambda: torch.ops.sparsify.routed_linear(x, sorted_ids, weight, bias, "torch")
        runs["routed_linear (torch), spans"] = \
            lambda: torch.ops.sparsify.routed_linear(x, span_ids, weight, bias, "torch")
        runs["boolean-mask loop (papers)"] = lambda: mask_loop_linear(x, ids, weight, bias)
        report(f"linear {args.d_in} -> {args.d_out}", timed(runs))

        ln_w, ln_b = rand(args.modalities, args.d_in), rand(args.modalities, args.d_in)
        runs = {"dense": lambda: F.layer_norm(x, (args.d_in,), ln_w[0], ln_b[0])}
        runs.update({f"routed_layer_norm ({b})": (
            lambda b=b: torch.ops.sparsify.routed_layer_norm(x, ids, ln_w, ln_b, 1e-5, b)) for b in backends})
        runs["boolean-mask loop (papers)"] = lambda: mask_loop_layer_norm(x, ids, ln_w, ln_b)
        report(f"layer_norm {args.d_in}", timed(runs))


if __name__ == "__main__":
    main()
