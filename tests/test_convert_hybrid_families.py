"""Hugging Face hybrid and Mamba-variant families no other test builds, converted with the default call.

Nothing in sparsify knows these classes: each is captured, planned and routed from
its graph alone. Under policy="auto" attention layers get the Mixture-of-Transformers
set (projections and norms), Mamba layers the Mixture-of-Mamba set (projections,
norms shared). fp32, 3 modalities, tolerance 1e-5 relative to the largest logit.
"""
import pytest
import torch
import transformers as T

import sparsify

SMALL = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2)
ATTENTION_HEADS = dict(num_attention_heads=4, num_key_value_heads=2)


def falcon_mamba():
    return T.FalconMambaForCausalLM(T.FalconMambaConfig(**SMALL, state_size=8, intermediate_size=64,
                                                        time_step_rank=4))


def jamba():  # Mamba1 layer with an MLP, then attention with a mixture-of-experts MLP
    return T.JambaForCausalLM(T.JambaConfig(
        **SMALL, **ATTENTION_HEADS, intermediate_size=64, mamba_d_state=8, mamba_expand=2, mamba_dt_rank=4,
        attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=2,
        num_experts_per_tok=1))


def bamba():  # Mamba2 layer, then attention
    return T.BambaForCausalLM(T.BambaConfig(
        **SMALL, **ATTENTION_HEADS, intermediate_size=64, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1,
        mamba_d_state=8, mamba_chunk_size=4, attn_layer_indices=[1]))


def granite_moe_hybrid():  # takes use_cache only through **kwargs; both layers have an expert router
    return T.GraniteMoeHybridForCausalLM(T.GraniteMoeHybridConfig(
        **SMALL, **ATTENTION_HEADS, intermediate_size=64, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1,
        mamba_d_state=8, mamba_chunk_size=4, layer_types=["mamba", "attention"], num_local_experts=2,
        num_experts_per_tok=1, shared_intermediate_size=64))


FAMILIES = {"falcon_mamba": falcon_mamba, "jamba": jamba, "bamba": bamba, "granite_moe_hybrid": granite_moe_hybrid}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_converts_and_equals_dense(family):
    torch.manual_seed(0)
    dense = FAMILIES[family]().eval()
    routed = sparsify.convert(dense, modalities=3)
    role = {p.fqn: p.role for p in routed.plan.params}  # the routed parameters
    plan = set(role)
    mamba_layer = next(p.rsplit(".in_proj.weight", 1)[0] for p in plan if p.endswith("in_proj.weight"))
    assert f"{mamba_layer}.out_proj.weight" in plan
    layer = mamba_layer.rsplit(".", 1)[0]  # the block holding the mixer: its norms stay shared (MoM)
    mamba_block_norms = {p for p in plan if p.startswith(layer + ".") and role[p] == "norm"}
    assert not mamba_block_norms
    attention = [p for p in plan if ".q_proj." in p]
    if family != "falcon_mamba":
        attention_block = attention[0].split(".self_attn.")[0]
        assert any(p.startswith(attention_block + ".") and role[p] == "norm" for p in plan)
    for seq in (5, 9):
        tokens, ids = torch.randint(0, 101, (2, seq)), torch.randint(0, 3, (2, seq))
        with torch.no_grad():
            got, want = routed(tokens, modality_ids=ids).logits, dense(tokens, use_cache=False).logits
        assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_routing_is_real(family):
    """Modality 1 holds only the last tokens. Perturbing modality 1's copies changes those tokens' logits and
    leaves the earlier ones (causal: they never see a modality-1 token) as they were."""
    torch.manual_seed(0)
    routed = sparsify.convert(FAMILIES[family]().eval(), modalities=3)
    tokens = torch.randint(0, 101, (2, 9))
    ids = torch.zeros(2, 9, dtype=torch.long)
    ids[:, 6:] = 1
    with torch.no_grad():
        before = routed(tokens, modality_ids=ids).logits
        for fqn in routed.plan.routed:
            routed.get_parameter(fqn)[1].mul_(1.25).add_(0.05)
        after = routed(tokens, modality_ids=ids).logits
    torch.testing.assert_close(after[:, :6], before[:, :6], rtol=0, atol=1e-6)
    assert float((after[:, 6:] - before[:, 6:]).abs().amax(-1).min()) > 1e-4
