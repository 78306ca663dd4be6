"""The block forms real models use, each converted on its own under `mot` and `all`: routed equals dense
at init at a shape other than the capture's, and routing is real (modality k's copies move exactly the
outputs whose receptive field holds a modality-k token). The property test draws them in random stacks;
here each form is checked deterministically. fp32, tolerance 1e-5 relative."""
import pytest
import torch

import sparsify
from tests.test_properties import Stack, relative_error, tokens_changed_by

FORMS = [["post_norm"], ["qk_norm_attention"], ["gated"], ["tied", "linear", "tied"]]


@pytest.mark.parametrize("policy", ["mot", "all"])
@pytest.mark.parametrize("pieces", FORMS, ids="+".join)
def test_block_form_converts_exactly_and_routes_per_token(pieces, policy):
    torch.manual_seed(0)
    d = 4
    dense = Stack(pieces, d).eval()
    routed = sparsify.convert(dense, 3, example_inputs=(torch.randn(2, 5, d),), policy=policy)
    names = {n for n, _ in dense.named_parameters(remove_duplicate=False)}  # tied weights under both FQNs
    routed_names = set(routed.plan.routed)
    if policy == "all":
        assert routed_names == names
    else:  # every linear and norm parameter; learned scales and gates (elementwise) stay shared under mot
        assert routed_names == {n for n in names if not n.endswith((".scale", ".gate"))}
    assert not routed.plan.notes, routed.plan.notes

    x, ids = torch.randn(3, 7, d), torch.tensor([[0, 1, 2, 0, 0, 1, 0], [2, 2, 0, 1, 0, 0, 0], [0] * 7])
    with torch.no_grad():
        assert relative_error(routed(x, modality_ids=ids), dense(x)) <= 1e-5
        before = routed(x, modality_ids=ids)
        for fqn in routed.plan.routed:
            routed.get_parameter(fqn)[1].add_(0.3)
        after = routed(x, modality_ids=ids)
    changed = (after - before).abs().amax(-1) > 1e-6
    assert torch.equal(changed, tokens_changed_by(pieces, ids, 1))
