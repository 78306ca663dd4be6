"""Decode speed: a routed model's `generate` with its cache vs the dense model's `generate`, in the same run.

Builds a Llama-style model (or an HF Mamba with --mamba) from a config with random weights, converts it with
3 modalities, and times greedy generation of --new tokens after a --prompt token prompt, both with a cache:
the dense model with transformers' default cache, the routed one with the StaticCache its graphs hold. Graphs
are captured in a warm-up call, not timed. Prints new tokens per second and the ratio (target on CPU: >= 0.9x).
"""
import argparse
import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM

import sparsify
from _interleaved import interleaved


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--modalities", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--mamba", action="store_true", help="HF MambaForCausalLM instead of Llama")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.mamba:
        config = MambaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, state_size=16, vocab_size=8000)
        dense = MambaForCausalLM(config).eval()
    else:
        config = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                             num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                             num_key_value_heads=max(1, args.hidden // 64), vocab_size=8000)
        dense = LlamaForCausalLM(config).eval()
    routed = sparsify.convert(dense, args.modalities, verify=False).eval()
    prompt = torch.randint(0, config.vocab_size, (args.batch, args.prompt))
    modality_ids = torch.randint(0, args.modalities, (args.batch, args.prompt))
    options = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)

    # Sequence b's new tokens get modality b % M: every decode step groups its rows into M GEMMs.
    per_row = torch.arange(args.batch) % args.modalities
    step_bytes = weight_bytes_per_step(dense, routed.plan, present=len(per_row.unique()))
    timings = interleaved({
        "dense": lambda: dense.generate(prompt, **options),
        "one": lambda: routed.generate(prompt, modality_ids=modality_ids, next_modality=1, **options),
        "mixed": lambda: routed.generate(prompt, modality_ids=modality_ids,
                                         next_modality=lambda new, so_far: per_row, **options),
    }, args.repeats)
    tokens_per_second = {name: args.batch * args.new / timings.median(name) for name in ("dense", "one", "mixed")}
    # tokens/s is the inverse of time: the speed ratio is dense's time over routed's, pair by pair
    name = "HF Mamba" if args.mamba else "Llama"
    print(f"{name} {args.layers} layers x {args.hidden}, batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, "
          f"{args.modalities} modalities, float32, cpu, greedy with cache: {args.repeats} repeats, interleaved; "
          "speed ratios are medians of the paired ratios (quartiles)")
    print(f"  dense   {tokens_per_second['dense']:9.1f} tokens/s   1.00x")
    print(f"  routed  {tokens_per_second['one']:9.1f} tokens/s   {timings.ratio('dense', 'one')}   "
          "(new tokens of one modality)")
    print(f"  routed  {tokens_per_second['mixed']:9.1f} tokens/s   {timings.ratio('dense', 'mixed')}   "
          "(sequence b's new tokens of modality b % M)")
    print(f"weights a decode step reads: dense and one modality {step_bytes[0] / 2**20:.1f} MiB, modality b % M "
          f"{step_bytes[1] / 2**20:.1f} MiB ({step_bytes[1] / step_bytes[0]:.2f}x: each present modality's copies)")


def weight_bytes_per_step(dense, plan, present: int) -> tuple[int, int]:
    """Bytes of weights one decode step streams: every parameter but the input embedding (a step gathers its
    rows; counted where it is tied to the output layer), for dense (= routed with one modality) and for a
    routed step whose rows hold `present` modalities (each reads its own copy of every routed parameter)."""
    embedding = dense.get_input_embeddings().weight
    output = dense.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    streamed = sum(p.numel() * p.element_size() for p in dense.parameters() if tied or p is not embedding)
    routed = sum(math.prod(p.shape) * dense.get_parameter(p.fqn).element_size() for p in plan.params)
    return streamed, streamed + (present - 1) * routed


if __name__ == "__main__":
    main()
