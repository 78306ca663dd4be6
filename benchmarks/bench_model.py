"""A routed model's training step vs its dense model's, measured in the same run, printed as a ratio.

Builds a Llama-style model from a config (random weights), converts it with 3 modalities, and times
forward+backward of both on the same tokens (interleaved random modality ids). Routing adds no FLOPs,
so 1.0x is the floor; the gap is the cost of grouping tokens by modality. Default size is small enough
for CPU; pass --hidden 2048 --layers 8 on a GPU.
"""
import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sparsify


def timed(step, repeats, cuda):
    step()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--modalities", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default: bfloat16 on a GPU, float32 on CPU)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75), num_hidden_layers=args.layers,
                         num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 64),
                         vocab_size=8000, max_position_embeddings=max(2048, args.seq))
    dense = LlamaForCausalLM(config).to(device, dtype).train()
    routed = sparsify.convert(dense, args.modalities, verify=False).train()
    routed.backend = args.backend
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    ids = torch.randint(0, args.modalities, (args.batch, args.seq), device=device)

    def dense_step():
        dense(tokens, use_cache=False).logits.float().pow(2).mean().backward()

    def routed_step():
        routed(tokens, modality_ids=ids).logits.float().pow(2).mean().backward()

    dense_s, routed_s = timed(dense_step, args.repeats, cuda), timed(routed_step, args.repeats, cuda)
    print(f"Llama {args.layers} layers x {args.hidden}, batch {args.batch} x seq {args.seq}, {args.modalities} "
          f"modalities, {str(dtype).removeprefix('torch.')}, {device}, backend {args.backend}: forward+backward, median of {args.repeats}")
    print(f"  dense   {dense_s * 1e3:9.1f} ms   1.00x")
    print(f"  routed  {routed_s * 1e3:9.1f} ms   {routed_s / dense_s:.2f}x")


if __name__ == "__main__":
    main()
