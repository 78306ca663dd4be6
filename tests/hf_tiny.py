"""Tiny random-weight Hugging Face causal LMs by model type, from transformers' own config classes.

COMMON shrinks the sizes most configs share; EXTRA holds what a family needs besides (per-layer lists
sized to the layer count, its own width knobs). Used by the family tests and benchmarks/sweep_families.py.
"""
import torch

COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
TWO_LAYER_TYPES = ["sliding_attention", "full_attention"]
EXTRA = {
    "gemma3n_text": dict(intermediate_size=[64, 64], layer_types=TWO_LAYER_TYPES, vocab_size_per_layer_input=128,
                         hidden_size_per_layer_input=8, num_kv_shared_layers=0, laurel_rank=4,
                         activation_sparsity_pattern=[0.0, 0.0], altup_num_inputs=2, sliding_window=16),
    "gemma4_text": dict(layer_types=TWO_LAYER_TYPES, sliding_window=16),
    "gemma3_text": dict(layer_types=TWO_LAYER_TYPES, sliding_window=16),
    "llama4_text": dict(intermediate_size_mlp=64, num_local_experts=2, interleave_moe_layer_step=1,
                        no_rope_layers=[1, 1]),
}


def tiny_causal_lm(model_type: str, seed: int = 0, **overrides):
    """An eval-mode tiny model of `model_type` (a key of MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**COMMON, **EXTRA.get(model_type, {}), **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()
