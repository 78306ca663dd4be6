"""A routed model's training step vs its dense model's, measured in the same run, printed as ratios.

For each model (a Llama-style transformer, Hugging Face MambaForCausalLM and Mamba2ForCausalLM, a mamba_ssm
MambaLMHeadModel; random weights from configs of similar size), converts it with 3 modalities and times
forward+backward of dense and routed on the same tokens (random modality ids per token). Routing adds no
FLOPs, so 1.0x is the floor; the gap is the cost of grouping tokens by modality. Dense and routed steps take
turns within each repeat, so a slow spell of a shared machine falls on both. Default sizes suit a CPU; on a
GPU pass e.g. --hidden 2048 --layers 8. Targets on CPU: transformer <= 1.05x, Mamba <= 1.10x.
"""
import argparse

import torch

import sparsify  # before mamba_ssm: installs its CPU stand-ins
from _interleaved import interleaved

MODELS = ("llama", "hf-mamba", "hf-mamba2", "mamba-ssm")


def build(name: str, hidden: int, layers: int, seq: int):
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        config = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
                             num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                             vocab_size=8000, max_position_embeddings=max(2048, seq))
        return LlamaForCausalLM(config), "Llama"
    if name == "hf-mamba":
        from transformers import MambaConfig, MambaForCausalLM
        config = MambaConfig(hidden_size=hidden, num_hidden_layers=layers, state_size=16, vocab_size=8000)
        return MambaForCausalLM(config), "HF Mamba"
    if name == "hf-mamba2":
        from transformers import Mamba2Config, Mamba2ForCausalLM
        config = Mamba2Config(hidden_size=hidden, num_hidden_layers=layers, state_size=16, vocab_size=8000,
                              head_dim=64, num_heads=2 * hidden // 64, n_groups=1, chunk_size=64)
        return Mamba2ForCausalLM(config), "HF Mamba2"
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    config = MambaConfig(d_model=hidden, n_layer=layers, vocab_size=8000, ssm_cfg={"layer": "Mamba1", "d_state": 16},
                         pad_vocab_size_multiple=1)
    return MambaLMHeadModel(config), "mamba_ssm Mamba1"


def logits(output):
    return output.logits if hasattr(output, "logits") else output[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--modalities", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--hoist", action=argparse.BooleanOptionalAction, default=True,
                        help="sort tokens by modality once per token-wise region (sparsify.convert(hoist=...))")
    parser.add_argument("--ids", default="random", choices=["random", "one"],
                        help="modality ids: random per token, or every token modality 0 (a text-only batch)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default: bfloat16 on a GPU, float32 on CPU)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    device = "cuda" if cuda else "cpu"
    print(f"{args.batch} x {args.seq} tokens, {args.modalities} modalities (ids {args.ids}), "
          f"{str(dtype).removeprefix('torch.')}, {device}, backend {args.backend}, hoist {args.hoist}: "
          f"forward+backward, {args.repeats} repeats, dense and routed interleaved")
    for name in args.models:
        torch.manual_seed(0)
        dense, label = build(name, args.hidden, args.layers, args.seq)
        dense = dense.to(device, dtype).train()
        routed = sparsify.convert(dense, args.modalities, verify=False, hoist=args.hoist).train()
        routed.backend = args.backend
        tokens = torch.randint(0, 8000, (args.batch, args.seq), device=device)
        ids = torch.randint(0, args.modalities, (args.batch, args.seq), device=device) if args.ids == "random" \
            else torch.zeros(args.batch, args.seq, dtype=torch.long, device=device)

        def step(model, **modality):  # as a training loop's step: gradients reset (to None, as optimizers do)
            model.zero_grad(set_to_none=True)
            logits(model(tokens, **modality)).float().pow(2).mean().backward()

        timings = interleaved({"dense": lambda: step(dense), "routed": lambda: step(routed, modality_ids=ids)},
                              args.repeats, torch.cuda.synchronize if cuda else None)
        print(f"{label}, {args.layers} layers x {args.hidden}")
        print(f"  dense   {timings.median('dense') * 1e3:9.1f} ms   1.00x")
        print(f"  routed  {timings.median('routed') * 1e3:9.1f} ms   {timings.ratio('routed', 'dense')} "
              "(median of the paired ratios, their quartiles)")


if __name__ == "__main__":
    main()
