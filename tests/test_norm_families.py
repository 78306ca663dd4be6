"""Every block norm of the Hugging Face families the suite builds is routed under `mot`, whatever its
spelling (Gemma 3n / Gemma 4 write x * torch.pow(ms + eps, -0.5); Llama 4 casts with type_as; Mamba2's
gated norm normalises groups), and an activation's own parameter is never called a norm. fp32, tolerance 1e-5 relative against the dense model."""
import warnings

import pytest
import torch

import sparsify
from tests.conftest import tiny_gpt2, tiny_llama
from tests.hf_tiny import tiny_causal_lm
from tests.test_convert_hybrid_families import bamba, granite_moe_hybrid, jamba
from tests.test_convert_mamba_hf import tiny_mamba, tiny_mamba2

FAMILIES = {"gpt2": tiny_gpt2, "llama": tiny_llama, "mamba": tiny_mamba, "mamba2": tiny_mamba2, "jamba": jamba,
            "bamba": bamba, "granite_moe_hybrid": granite_moe_hybrid,
            **{t: (lambda t=t: tiny_causal_lm(t)) for t in ("gemma3n_text", "gemma4_text", "llama4_text", "bloom")}}


def block_norm_parameters(model) -> set[str]:
    """Parameters of the norm modules inside the repeated blocks, found by module class name: the test's
    independent view of what a norm is (routing itself never reads class names)."""
    return {f"{name}.{p}" for name, module in model.named_modules()
            if ".layers." in f".{name}." or ".h." in f".{name}."
            if type(module).__name__.endswith(("Norm", "NormGated"))
            for p, _ in module.named_parameters(recurse=False)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_block_norm_is_routed_under_mot(family):
    dense = FAMILIES[family]()
    norms = block_norm_parameters(dense)
    assert norms, family
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        routed = sparsify.convert(dense, 3, policy="mot")
    assert norms <= set(routed.plan.routed), sorted(norms - set(routed.plan.routed))
    # no norm left shared; a grouped norm (Mamba2's gated RMSNorm over groups) is routed as a per-token
    # scale, not fused, and the plan says so
    assert not [str(w.message) for w in caught if "stays shared" in str(w.message)]
    assert all("routed as a plain per-token scale" in note for note in routed.plan.notes), routed.plan.notes
    assert routed.verify_report.ok and routed.verify_report.max_rel_err <= 1e-5
    vocab = dense.get_input_embeddings().num_embeddings
    x, ids = torch.randint(3, vocab, (2, 9)), torch.randint(0, 3, (2, 9))
    with torch.no_grad():
        want, got = dense(x, use_cache=False).logits, routed(x, modality_ids=ids).logits
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


@pytest.mark.parametrize("family", ["gemma3n_text", "gemma4_text"])
def test_gemma_pow_norms_are_fused_routed_norms(family):
    routed = sparsify.convert(tiny_causal_lm(family), 3, policy="mot")
    norm_uses = [use for p in routed.plan.params if p.role == "norm" for use in p.uses]
    assert norm_uses and all("norm_pattern_weight" in use and "pow_neg_half" in use for use in norm_uses), norm_uses
    # routing is real: modality 1's norm copies move modality-1 tokens only
    x = torch.randint(3, 128, (1, 8))
    ids = torch.tensor([[0, 1, 0, 2, 1, 0, 0, 2]])
    with torch.no_grad():
        before = routed(x, modality_ids=ids).logits
        for p in routed.plan.params:
            if p.role == "norm":
                routed.get_parameter(p.fqn)[1].mul_(1.5)
        after = routed(x, modality_ids=ids).logits
    changed = (after - before).abs().amax(-1) > 1e-5
    assert bool(changed[ids == 1].all()) and not bool(changed[:, :1].any())  # token 0 sees no modality-1 token


def test_an_activation_parameter_is_not_called_a_norm():
    # Apertus's xIELU activation has learned alpha_p / alpha_n, a few ops below the block's norm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        routed = sparsify.convert(tiny_causal_lm("apertus"), 3)
    activation = [p for p in routed.plan.params + routed.plan.shared if "act_fn" in p.fqn]
    assert activation and all(p.role != "norm" for p in activation), [(p.fqn, p.role) for p in activation]
    assert not any("act_fn" in note for note in routed.plan.notes), routed.plan.notes
    assert "act_fn" not in "".join(line for line in routed.plan.summary().splitlines() if line.startswith("note"))
