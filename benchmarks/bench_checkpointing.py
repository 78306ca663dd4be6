"""Activation memory of a training step with and without activation checkpointing per block, dense vs routed.

Measures the bytes of activations a forward keeps for backward (every tensor autograd saves, counted
once per storage, through torch.autograd.graph.saved_tensors_hooks): what activation checkpointing
exists to lower, and the part of peak memory that grows with batch x sequence. Checkpointing is
torch.distributed's `apply_activation_checkpointing` with `checkpoint_wrapper` on every decoder layer,
as for the dense model. Also checks that the checkpointed routed model's gradients equal the plain one's.
Usage: python benchmarks/bench_checkpointing.py [--layers 4] [--hidden 256] [--batch 4] [--seq 256]
"""
import argparse
import copy

import torch
import torch.nn.functional as F
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (apply_activation_checkpointing,
                                                                         checkpoint_wrapper)
from transformers import LlamaConfig, LlamaForCausalLM

import sparsify


def saved_bytes_and_grads(model, tokens, forward):
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = forward(model, tokens)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return sum(storages.values()), {n: p.grad for n, p in model.named_parameters()}


def checkpointed(model, layers_of):
    model = copy.deepcopy(model)
    layers = set(layers_of(model))
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper, check_fn=lambda m: m in layers)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(num_hidden_layers=args.layers, hidden_size=args.hidden,
                                         intermediate_size=int(2.75 * args.hidden), num_attention_heads=4,
                                         num_key_value_heads=4, vocab_size=1024)).train()
    routed = sparsify.convert(dense, modalities=3).train()
    tokens = torch.randint(0, 1024, (args.batch, args.seq))
    ids = torch.randint(0, 3, tokens.shape)
    run_dense = lambda model, t: model(t, use_cache=False).logits  # noqa: E731
    run_routed = lambda model, t: model(t, modality_ids=ids).logits  # noqa: E731
    layers = lambda model: model.model.layers  # noqa: E731
    results = {}
    for name, model, run in [("dense", dense, run_dense), ("routed", routed, run_routed)]:
        plain_bytes, plain_grads = saved_bytes_and_grads(copy.deepcopy(model), tokens, run)
        checked_bytes, checked_grads = saved_bytes_and_grads(checkpointed(model, layers), tokens, run)
        worst = max(float((g - plain_grads[n.replace("._checkpoint_wrapped_module", "")]).abs().max())
                    for n, g in checked_grads.items())
        results[name] = (plain_bytes, checked_bytes, worst)
    print(f"Llama {args.layers} x {args.hidden}, tokens {args.batch} x {args.seq}, fp32, 3 modalities: "
          "activation bytes saved for backward")
    print(f"{'model':8} {'plain MiB':>10} {'checkpointed MiB':>17} {'ratio':>6}  max |grad diff|")
    for name, (plain, checked, worst) in results.items():
        print(f"{name:8} {plain / 2**20:10.1f} {checked / 2**20:17.1f} {checked / plain:6.2f}  {worst:.1e}")
    print(f"routed / dense: plain {results['routed'][0] / results['dense'][0]:.2f}x, "
          f"checkpointed {results['routed'][1] / results['dense'][1]:.2f}x")


if __name__ == "__main__":
    main()
