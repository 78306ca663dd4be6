"""The routed embedding (ops/routed_embedding.py, one spec) and the LM head: shared under every preset,
routed per modality with include=. fp32; at init the routed model equals the dense one (max rel err 1e-5)."""
import pytest
import torch

import sparsify
from sparsify import ops
from tests.conftest import tiny_gpt2, tiny_llama


def test_op_looks_up_each_tokens_modality_row_and_sends_gradients_to_it():
    torch.manual_seed(0)
    weight = torch.randn(3, 11, 4, requires_grad=True)
    tokens = torch.tensor([[1, 5, 5, 0, 10], [3, 3, 7, 1, 2]])
    ids = torch.tensor([[0, 1, 2, 2, 1], [1, 1, 0, 0, 2]])
    out = ops.routed_embedding(tokens, ids, weight, padding_idx=3)
    assert torch.equal(out, weight[ids, tokens])
    grad = torch.randn_like(out)
    out.backward(grad)
    expected = torch.zeros_like(weight)
    for (b, t), m in zip(torch.cartesian_prod(torch.arange(2), torch.arange(5)).tolist(), ids.flatten().tolist()):
        if tokens[b, t] != 3:  # the padding row gets no gradient, as nn.Embedding's
            expected[m, tokens[b, t]] += grad[b, t]
    assert torch.allclose(weight.grad, expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        ops.routed_embedding(tokens, ids + 1, weight)


@pytest.mark.parametrize("policy", ["auto", "mot", "mom", "all"])
def test_embeddings_stay_shared_under_every_policy(policy):
    routed = sparsify.convert(tiny_llama(), 3, policy=policy)
    shared = {p.fqn: p.reason for p in routed.plan.shared}
    assert "an embedding table" in shared["model.embed_tokens.weight"]


def routed_real(routed, tokens, ids):
    """Modality 1's copies perturbed: rows of modality 0 alone unchanged, every modality-1 token changed."""
    with torch.no_grad():
        before = routed(tokens, modality_ids=ids).logits
        for fqn in routed.plan.routed:
            routed.get_parameter(fqn)[1].add_(0.1)
        after = routed(tokens, modality_ids=ids).logits
    moved = (after - before).abs().amax(-1)
    return bool(moved[0].max() == 0) and bool((moved[ids == 1] > 0).all())


def test_include_routes_the_embedding_and_the_lm_head():
    dense = tiny_llama()
    routed = sparsify.convert(dense, 3, include=r"embed_tokens|lm_head")
    by_fqn = {p.fqn: p for p in routed.plan.params}
    assert by_fqn["model.embed_tokens.weight"].role == "embedding" and by_fqn["lm_head.weight"].role == "linear"
    assert routed.get_parameter("model.embed_tokens.weight").shape == (3, 101, 32)
    assert routed.verify_report.ok and routed.verify_report.max_rel_err <= 1e-5
    tokens = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[0] * 9, [0, 1, 2, 1, 0, 0, 2, 1, 1]])
    with torch.no_grad():
        want, got = dense(tokens, use_cache=False).logits, routed(tokens, modality_ids=ids).logits
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5
    # gradients per modality: a modality's embedding rows get gradient only from its own tokens
    routed.zero_grad()
    routed(tokens, modality_ids=ids).logits.sum().backward()
    grad = routed.get_parameter("model.embed_tokens.weight").grad
    for m in range(3):
        rows = set(tokens[ids == m].tolist())
        assert set(torch.nonzero(grad[m].abs().sum(-1)).flatten().tolist()) == rows, m
    assert routed_real(routed, tokens, ids)


def test_a_tied_embedding_and_head_route_together():
    dense = tiny_gpt2()  # wte is also the LM head's weight
    routed = sparsify.convert(dense, 2, include=r"wte")
    (param,) = [p for p in routed.plan.params if p.fqn == "transformer.wte.weight"]
    assert "lm_head.weight" in param.aliases
    assert any("embedding" in u for u in param.uses) and any("linear" in u for u in param.uses)
    assert routed.verify_report.ok and routed.verify_report.max_rel_err <= 1e-5
    tokens = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(4))
    assert routed_real(routed, tokens, torch.tensor([[0] * 7, [1, 0, 1, 1, 0, 0, 1]]))


def test_generation_with_a_routed_embedding_equals_dense():
    dense = tiny_llama()
    routed = sparsify.convert(dense, 3, include=r"embed_tokens")
    prompt = torch.randint(0, 101, (2, 5), generator=torch.Generator().manual_seed(5))
    expected = dense.generate(prompt, max_new_tokens=4, do_sample=False)
    out = routed.generate(prompt, modality_ids=torch.zeros_like(prompt), next_modality=0, max_new_tokens=4,
                          do_sample=False)
    assert torch.equal(out, expected)
