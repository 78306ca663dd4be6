"""Tiny random-weight Hugging Face causal LMs by model type, from transformers' own config classes.

`tiny_config` shrinks any config generically: the sizes most configs share (COMMON) wherever the config has
them, its sub-configs (text_config, ...) alike, and every per-layer list cut to the new layer count. It keeps
what makes the family what it is: its kind of attention (multi-head, multi-query or grouped keys), one layer
of each kind where layer kinds are listed (a hybrid keeps an attention layer), sizes that must agree (a
Mamba2 mixer's heads tile its width). EXTRA holds what a few families need besides. Used by the family tests
and benchmarks/sweep_families.py.
"""
import torch

LAYERS = 2
COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64, d_model=32, num_layers=LAYERS,
              ffn_hidden_size=64, n_inner=64, max_seq_len=64, seq_length=64, vocab_size_per_layer_input=128,
              hidden_size_per_layer_input=8, num_kv_shared_layers=0, laurel_rank=4, altup_num_inputs=2,
              sliding_window=16, intermediate_size_mlp=64, num_local_experts=2, num_experts=2, n_routed_experts=2,
              num_experts_per_tok=1, moe_intermediate_size=16, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4,
              qk_nope_head_dim=4, v_head_dim=8, first_k_dense_replace=1, rotary_dim=4, n_group=1, topk_group=1,
              num_experts_per_token=1, mamba_n_heads=4, mamba_d_head=16, mamba_d_ssm=64, mamba_n_groups=1, mamba_d_state=8,
              mamba_chunk_size=4, encoder_attention_heads=4, decoder_attention_heads=4, encoder_layers=LAYERS,
              decoder_layers=LAYERS, encoder_ffn_dim=64, decoder_ffn_dim=64, num_expert_group=1, attn_layer_period=2,
              attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, emb_dim=32, n_layers=LAYERS)
SUB_CONFIGS = ("text_config", "language_config", "llm_config")
EXTRA = {"llama4_text": dict(interleave_moe_layer_step=1)}


def _overrides(defaults: dict) -> dict:
    layers = (defaults.get("num_hidden_layers") or defaults.get("n_layer") or defaults.get("num_layers")
              or defaults.get("n_layers"))
    out = {k: v for k, v in COMMON.items() if k in defaults}
    for key, value in defaults.items():
        if key in out or not layers:
            continue
        if isinstance(value, dict) and value and all(str(k).isdigit() for k in value):  # settings by layer index
            out[key] = {k: v for k, v in value.items() if int(k) < LAYERS}
        if not isinstance(value, list):
            continue
        if len(value) > LAYERS and len(set(map(str, value))) > 1 and all(isinstance(v, str) for v in value):
            # layer kinds, per layer or a repeating pattern: one layer of each kind first (a hybrid's first
            # layers may all be of one kind), in the family's order, so the tiny model has attention,
            # recurrent, sliding... layers as the full one does
            kinds = list(dict.fromkeys(value))
            per_layer = sorted((kinds + [v for v in value if v not in kinds[:LAYERS]])[:LAYERS], key=value.index)
        elif len(value) == layers:
            per_layer = value[:LAYERS]  # per-layer lists (sizes, patterns) follow the layer count
        else:
            continue
        if key in COMMON:
            per_layer = [COMMON[key]] * LAYERS
        out[key] = per_layer
    heads, kv_heads = defaults.get("num_attention_heads"), defaults.get("num_key_value_heads")
    if "num_key_value_heads" in out and heads and kv_heads in (1, heads):
        # keep the family's kind of attention: multi-head (every head its own keys, as multi-head latent
        # attention's decompressed keys are) or multi-query; grouped-query otherwise
        out["num_key_value_heads"] = 1 if kv_heads == 1 else COMMON["num_attention_heads"]
    if "head_dim" in out and defaults.get("head_dim") == defaults.get("qk_rope_head_dim"):
        out["head_dim"] = COMMON["qk_rope_head_dim"]  # multi-head latent attention: the rotary part's size
    if {"num_heads", "expand", "head_dim"} <= set(defaults) and "hidden_size" in out:
        # a Mamba2 mixer: its heads tile the expanded width
        out["num_heads"] = out["hidden_size"] * defaults["expand"] // out.get("head_dim", defaults["head_dim"])
    if isinstance(defaults.get("intermediate_size"), list):
        out["intermediate_size"] = [COMMON["intermediate_size"]] * LAYERS
    return out


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(model_type).to_dict()
    kwargs = _overrides(defaults)
    for sub in SUB_CONFIGS:
        if isinstance(defaults.get(sub), dict):
            kwargs[sub] = {**defaults[sub], **_overrides(defaults[sub])}
    kwargs.update(EXTRA.get(model_type, {}))
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_causal_lm(model_type: str, seed: int = 0, **overrides):
    """An eval-mode tiny model of `model_type` (a key of MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if "is_decoder" in AutoConfig.for_model(model_type).to_dict():
        # An encoder family's causal-LM head (BertLMHeadModel, ...) is a decoder only when asked (transformers
        # warns otherwise): causal attention and a cache, as anyone generating with it sets.
        overrides = {"is_decoder": True, **overrides}
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()
