"""routed.generate against the dense model's generate, across Hugging Face families, in one run.

Each family is built from a tiny config with random weights, converted with 2 modalities (init="copy": the
routed model equals the dense one), and asked for 6 new tokens after a left-padded batch of 2 prompts:
greedy with the cache, 2 beams with the cache, greedy without it. Prints one line per family and case and
exits 1 if any routed generation differs from dense or fails. Not part of `make test` (about 10 minutes
on 2 cores: every family is captured several times); tests/test_generation.py covers the mechanisms on a
few of them. Usage: python demos/generate_across_families.py [family ...]
"""
import sys
import traceback

import torch
import transformers as T

import sparsify

SMALL = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2)
HEADS = dict(num_attention_heads=4, num_key_value_heads=2)
MAMBA2 = dict(mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=4)

FAMILIES = {
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=4)),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**SMALL, **HEADS, intermediate_size=64)),
    "mistral (sliding window 4)": lambda: T.MistralForCausalLM(T.MistralConfig(
        **SMALL, **HEADS, intermediate_size=64, sliding_window=4)),
    "gemma2 (sliding window 4)": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(
        **SMALL, **HEADS, intermediate_size=64, head_dim=8, sliding_window=4)),
    "gemma3 (sliding + full)": lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(
        **SMALL, **HEADS, intermediate_size=64, head_dim=8, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"])),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**SMALL, **HEADS, intermediate_size=64)),
    "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**SMALL, **HEADS, intermediate_size=64, head_dim=8)),
    "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(**SMALL, **HEADS, intermediate_size=64, pad_token_id=0)),
    "olmo2": lambda: T.Olmo2ForCausalLM(T.Olmo2Config(**SMALL, **HEADS, intermediate_size=64, pad_token_id=0)),
    "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**SMALL, num_attention_heads=4, intermediate_size=64)),
    "mamba": lambda: T.MambaForCausalLM(T.MambaConfig(**SMALL, state_size=8)),
    "mamba2": lambda: T.Mamba2ForCausalLM(T.Mamba2Config(
        **SMALL, state_size=8, head_dim=16, num_heads=4, n_groups=1, expand=2, chunk_size=4)),
    "falcon_mamba": lambda: T.FalconMambaForCausalLM(T.FalconMambaConfig(
        **SMALL, state_size=8, intermediate_size=64, time_step_rank=4)),
    "jamba": lambda: T.JambaForCausalLM(T.JambaConfig(
        **SMALL, **HEADS, intermediate_size=64, mamba_d_state=8, mamba_expand=2, mamba_dt_rank=4,
        attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=2,
        num_experts_per_tok=1)),
    "bamba": lambda: T.BambaForCausalLM(T.BambaConfig(
        **SMALL, **HEADS, intermediate_size=64, **MAMBA2, attn_layer_indices=[1])),
    "granite_moe_hybrid": lambda: T.GraniteMoeHybridForCausalLM(T.GraniteMoeHybridConfig(
        **SMALL, **HEADS, intermediate_size=64, **MAMBA2, layer_types=["mamba", "attention"],
        num_local_experts=2, num_experts_per_tok=1, shared_intermediate_size=64)),
    "falcon_h1": lambda: T.FalconH1ForCausalLM(T.FalconH1Config(
        **SMALL, **HEADS, intermediate_size=64, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
        mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=4)),
    "zamba2": lambda: T.Zamba2ForCausalLM(T.Zamba2Config(
        **SMALL, num_attention_heads=4, num_key_value_heads=4, intermediate_size=64, mamba_d_state=8,
        mamba_headdim=8, n_mamba_heads=8, chunk_size=4, layers_block_type=["mamba", "hybrid"])),
    "lfm2": lambda: T.Lfm2ForCausalLM(T.Lfm2Config(
        **SMALL, **HEADS, intermediate_size=64, layer_types=["conv", "full_attention"])),
    "qwen3_next": lambda: T.Qwen3NextForCausalLM(T.Qwen3NextConfig(
        **SMALL, **HEADS, intermediate_size=64, head_dim=8, linear_num_value_heads=4, linear_num_key_heads=2,
        linear_key_head_dim=8, linear_value_head_dim=8, num_experts=2, num_experts_per_tok=1,
        moe_intermediate_size=32, shared_expert_intermediate_size=32,
        layer_types=["linear_attention", "full_attention"])),
}
CASES = {"greedy, cache": dict(), "2 beams, cache": dict(num_beams=2), "greedy, no cache": dict(use_cache=False)}


def main(names) -> int:
    unknown = [name for name in names if name not in FAMILIES]
    if unknown:
        print(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
        return 2
    failures = 0
    for name in names or FAMILIES:
        torch.manual_seed(0)
        dense = FAMILIES[name]().eval()
        routed = sparsify.convert(dense, modalities=2).eval()
        ids = torch.randint(3, 101, (2, 7))
        mask = torch.ones_like(ids)
        mask[0, :3] = 0  # left padding: the first prompt is 4 tokens long
        for case, options in CASES.items():
            options = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, **options)
            expected = dense.generate(ids, **options)
            try:
                out = routed.generate(ids, modality_ids=torch.zeros_like(ids), **options)
                verdict = "equal" if torch.equal(out, expected) else f"DIFFERS: {out.tolist()} vs {expected.tolist()}"
            except Exception as error:  # report and go on with the next family
                verdict = f"FAILS: {type(error).__name__}: {error}"
                traceback.print_exc()
            failures += verdict != "equal"
            print(f"{name:28s} {case:18s} {verdict}", flush=True)
    print(f"{failures} of the cases differ or fail")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
