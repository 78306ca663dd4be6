"""End to end on Hugging Face GPT-2 (Conv1D: addmm with [in, out] weights, LayerNorm) and Llama
(linear, decomposed RMSNorm, rotary buffers), 3 modalities, fp32."""
import copy

import pytest
import torch

import sparsify
from tests.conftest import MODEL_FACTORIES

RTOL = 1e-5  # fp32: max |routed - dense| / max |dense| of the logits


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def tokens(batch, seq, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 101, (batch, seq), generator=g), torch.randint(0, 3, (batch, seq), generator=g)


@pytest.mark.parametrize("batch,seq", [(2, 13), (3, 7), (1, 1), (4, 29)])
def test_equals_dense_at_init_for_any_shape(converted, batch, seq):
    _, dense, routed = converted
    x, ids = tokens(batch, seq)
    with torch.no_grad():
        expected = dense(x, use_cache=False).logits
        got = routed(x, modality_ids=ids).logits
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= RTOL


def test_convert_does_not_modify_the_dense_model(converted):
    name, dense, routed = converted
    fresh = MODEL_FACTORIES[name]()
    for (n, p), (_, q) in zip(dense.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), n
    assert routed.verify_report.ok and routed.verify_report.max_rel_err <= RTOL


def test_routed_parameters_are_stacked_under_dense_fqns(converted):
    _, dense, routed = converted
    dense_params = dict(dense.named_parameters())
    routed_params = dict(routed.named_parameters())
    assert set(routed_params) == set(dense_params)
    for fqn in routed.plan.routed:
        assert routed_params[fqn].shape == (3, *dense_params[fqn].shape)
        for m in range(3):
            assert torch.equal(routed_params[fqn][m], dense_params[fqn])
    assert set(routed.state_dict()) == set(dense.state_dict())


def test_mot_preset_routes_block_linears_and_norms_only(converted):
    name, dense, routed = converted
    routed_set = set(routed.plan.routed)
    in_blocks = {n for n, _ in dense.named_parameters() if ".h." in n or ".layers." in n}
    assert routed_set == in_blocks  # every block parameter of these models is a linear or norm parameter
    shared = {p.fqn for p in routed.plan.shared}
    assert shared.isdisjoint(routed_set)
    # embeddings, final norm and LM head stay shared
    assert all(".h." not in n and ".layers." not in n for n in shared)


def test_call_forms_and_output_structure(converted):
    _, dense, routed = converted
    x, ids = tokens(2, 9)
    out_positional = routed(x, modality_ids=ids)
    out_keyword = routed(input_ids=x, use_cache=False, modality_ids=ids)
    assert type(out_positional) is type(dense(x, use_cache=False))
    assert torch.equal(out_positional.logits, out_keyword.logits)


def test_routing_is_real(converted):
    _, dense, routed = converted
    routed = copy.deepcopy(routed)
    x, _ = tokens(2, 11)
    text_only = torch.zeros(2, 11, dtype=torch.long)
    mixed = text_only.clone()
    mixed[:, 5:] = 2
    with torch.no_grad():
        before_text, before_mixed = routed(x, modality_ids=text_only).logits, routed(x, modality_ids=mixed).logits
        for fqn in routed.plan.routed:
            routed.get_parameter(fqn)[2].add_(0.5 * torch.randn_like(routed.get_parameter(fqn)[2]))
        after_text, after_mixed = routed(x, modality_ids=text_only).logits, routed(x, modality_ids=mixed).logits
    assert torch.equal(before_text, after_text)  # no modality-2 token: modality 2's copies unused
    # causal model: positions before the first modality-2 token are unchanged, later ones change
    assert torch.equal(before_mixed[:, :5], after_mixed[:, :5])
    assert (before_mixed[:, 5:] - after_mixed[:, 5:]).abs().max() > 1e-3


def test_each_copy_gets_gradient_only_from_its_own_tokens(converted):
    _, dense, routed = converted
    routed, dense = copy.deepcopy(routed), copy.deepcopy(dense)
    x, _ = tokens(2, 10)
    ids = torch.randint(0, 2, (2, 10), generator=torch.Generator().manual_seed(3))  # modality 2 absent
    weights = torch.randn(2, 10, 101, generator=torch.Generator().manual_seed(4))
    (routed(x, modality_ids=ids).logits * weights).sum().backward()
    (dense(x, use_cache=False).logits * weights).sum().backward()
    for fqn in routed.plan.routed:
        grad = routed.get_parameter(fqn).grad
        assert grad is not None, fqn
        assert torch.count_nonzero(grad[2]) == 0, fqn
        assert grad[0].abs().max() > 0 and grad[1].abs().max() > 0, fqn
        # all copies equal the dense weight, so their gradients add up to the dense gradient
        dense_grad = dense.get_parameter(fqn).grad
        # fp32: summation order differs, so bound the difference by the gradient's scale
        assert float((grad.sum(0) - dense_grad).abs().max()) <= 1e-4 * float(dense_grad.abs().max()), fqn
    # shared parameters still train
    for p in routed.plan.shared:
        if p.role == "embedding":
            assert routed.get_parameter(p.fqn).grad is not None


def test_optimizer_step_trains_the_stacked_parameters(converted):
    _, _, routed = converted
    routed = copy.deepcopy(routed).train()
    x, ids = tokens(2, 8)
    opt = torch.optim.SGD(routed.parameters(), lr=0.1)
    fqn = routed.plan.routed[0]
    before = routed.get_parameter(fqn).detach().clone()
    routed(x, modality_ids=ids).logits.pow(2).mean().backward()
    opt.step()
    assert not torch.equal(before, routed.get_parameter(fqn))


def test_train_and_eval_follow_the_mode_like_dense():
    dense = MODEL_FACTORIES["gpt2"](resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.0)
    routed = sparsify.convert(dense, modalities=2)
    x, _ = tokens(2, 9)
    ids = torch.zeros(2, 9, dtype=torch.long)
    routed.train()
    torch.manual_seed(0)
    a = routed(x, modality_ids=ids).logits
    b = routed(x, modality_ids=ids).logits
    assert not torch.allclose(a, b)  # dropout is live
    routed.eval()
    c = routed(x, modality_ids=ids).logits
    assert rel_err(c, dense(x, use_cache=False).logits) <= RTOL
    # same RNG stream, same dropout masks as the dense model in train mode
    dense.train()
    torch.manual_seed(7)
    d = dense(x, use_cache=False).logits
    routed.train()
    torch.manual_seed(7)
    e = routed(x, modality_ids=ids).logits
    assert rel_err(e, d) <= RTOL


def test_to_bfloat16_recaptures_for_the_new_dtype(converted):
    _, dense, routed = converted
    dense_bf16 = copy.deepcopy(dense).to(torch.bfloat16)
    routed_bf16 = copy.deepcopy(routed).to(torch.bfloat16)
    x, ids = tokens(2, 9)
    with torch.no_grad():
        got = routed_bf16(x, modality_ids=ids).logits
        expected = dense_bf16(x, use_cache=False).logits
        exact = dense(x, use_cache=False).logits
    assert got.dtype == torch.bfloat16
    # bf16: the routed model is no further from the fp32 result than 2x the dense model's own bf16 error
    own_error = (expected.float() - exact).abs().max()
    assert (got.float() - exact).abs().max() <= 2 * own_error + 1e-2


def test_plan_json_round_trip_and_summary(converted):
    _, _, routed = converted
    plan = routed.plan
    again = sparsify.RoutingPlan.from_json(plan.to_json())
    assert again == plan
    summary = plan.summary()
    assert plan.params[0].fqn in summary and "3 modalities" in summary and "->" in summary


def test_save_load_round_trip(converted, tmp_path):
    _, _, routed = converted
    path = sparsify.save(routed, tmp_path / "routed")
    assert {"model.safetensors", "sparsify.json", "config.json"} <= {p.name for p in path.iterdir()}
    loaded = sparsify.load(path)  # no model code needed for Hugging Face models
    x, ids = tokens(3, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x, modality_ids=ids).logits, routed(x, modality_ids=ids).logits)
    assert loaded.plan == routed.plan
    with pytest.raises(sparsify.SparsifyError, match="already exists"):
        sparsify.save(routed, path)


def test_independent_init_gives_distinct_copies_and_verifies_per_modality():
    dense = MODEL_FACTORIES["llama"]()
    routed = sparsify.convert(dense, modalities=3, init="independent")
    assert routed.verify_report.ok
    fqn = "model.layers.0.self_attn.q_proj.weight"
    w = routed.get_parameter(fqn)
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    # re-initialised the way the dense model initialises linears: std = initializer_range
    assert abs(float(w.std()) - dense.config.initializer_range) < 0.005
