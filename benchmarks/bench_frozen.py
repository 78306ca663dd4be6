"""What freezing a modality saves: the routed linear's backward and a whole training step, frozen vs not.

Two measurements, each against a baseline run in turns with it (benchmarks/_interleaved.py):
- op: the routed linear's backward (dx and dW) on ROWS rows split evenly over M modalities, with F of them
  frozen (their dW GEMMs skipped) vs none. dx is a GEMM over every row either way, so the expected ratio is
  (1 + (M - F) / M) / 2 where the two GEMMs cost alike.
- step: a Llama training step (forward, backward, AdamW) of the model split into per-modality copies with
  modality 0 frozen, vs the same split with nothing frozen, vs the model as converted (stacked parameters,
  no split: what a model that never freezes runs). The second ratio is what the split itself costs (the
  forward stacks the copies).
Usage: python benchmarks/bench_frozen.py [--rows 4096] [--features 1024] [--modalities 2] [--hidden 256]
"""
import argparse
import copy

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import sparsify
from sparsify.ops.routed_linear import routed_linear_backward_ref
from _interleaved import interleaved


def op_ratio(args) -> str:
    g = torch.Generator().manual_seed(0)
    m, rows, n = args.modalities, args.rows, args.features
    x, grad = torch.randn(rows, n, generator=g), torch.randn(rows, n, generator=g)
    weight = torch.randn(m, n, n, generator=g) / n ** 0.5
    ids = torch.arange(m).repeat_interleave(rows // m + 1)[:rows]  # in modality order: one GEMM per modality
    runs = {"none": lambda: routed_linear_backward_ref(grad, x, ids, weight, False),
            "frozen": lambda: routed_linear_backward_ref(grad, x, ids, weight, False, frozen=list(range(args.frozen)))}
    timings = interleaved(runs, args.repeats)
    expected = (1 + (m - args.frozen) / m) / 2
    return (f"routed linear backward, {rows} rows x {n} -> {n}, {m} modalities, {args.frozen} frozen / none frozen: "
            f"{timings.ratio('frozen', 'none')} (expected ~{expected:.2f} if dx and dW cost alike)")


def step_ratios(args) -> list[str]:
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(
        vocab_size=512, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75), num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=args.seq))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 512, (args.batch, args.seq), generator=g)
    ids = torch.randint(0, args.modalities, (args.batch, args.seq), generator=g)
    stacked = sparsify.convert(dense, modalities=args.modalities).train()
    split = copy.deepcopy(stacked)
    split.param_groups()  # split, nothing frozen
    frozen = copy.deepcopy(stacked).freeze(0)

    def step_of(model):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            logits = model(tokens, modality_ids=ids).logits
            F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    timings = interleaved({"stacked": step_of(stacked), "split": step_of(split), "frozen": step_of(frozen)},
                          args.repeats)
    shape = f"Llama hidden {args.hidden}, 2 layers, {args.batch} x {args.seq} tokens, {args.modalities} modalities"
    return [f"training step, {shape}: modality 0 frozen / split, none frozen: {timings.ratio('frozen', 'split')}",
            f"training step, {shape}: split into per-modality copies / stacked: {timings.ratio('split', 'stacked')}"]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--modalities", type=int, default=2)
    parser.add_argument("--frozen", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=12)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 on CPU")
    print(op_ratio(args))
    for line in step_ratios(args):
        print(line)


if __name__ == "__main__":
    main()
