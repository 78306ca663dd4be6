"""The block forms real models use, each converted on its own under `mot` and `all`: routed equals dense
at init at a shape other than the capture's, and routing is real (modality k's copies move exactly the
outputs whose receptive field holds a modality-k token). The property test draws them in random stacks;
here each form is checked deterministically. fp32, tolerance 1e-5 relative."""
import pytest
import torch
import torch.nn.functional as F

import sparsify
from tests.test_properties import Stack, relative_error, tokens_changed_by
from tests.toy_models import DelayedState, LearnedPrompt, PredictingStreams, QueryStream

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


def test_a_projection_also_applied_to_a_state_before_the_first_token_uses_modality_0s_copy_there():
    """Zaya's delayed value (tests/toy_models.DelayedState): its per-token use is routed by token, its use on
    the zero state (no token went into it) takes modality 0's copy; a parameter used on that state alone stays
    shared under a preset and is refused under include=. fp32."""
    torch.manual_seed(0)
    dense = DelayedState().eval()
    example = (torch.randint(0, 50, (2, 7)),)
    with pytest.warns(UserWarning, match="layers.0.start.weight"):
        routed = sparsify.convert(dense, 3, example_inputs=example, policy="mot")
    assert {"layers.0.delayed.weight", "layers.0.delayed.bias"} <= set(routed.plan.routed)
    uses = next(p.uses for p in routed.plan.params if p.fqn == "layers.0.delayed.weight")
    assert sum("no token: modality 0's copy" in use for use in uses) == 1, uses
    reasons = {p.fqn: p.reason for p in routed.plan.shared}
    assert "no input token went into" in reasons["layers.0.start.weight"]

    tokens, ids = torch.randint(0, 50, (3, 6)), torch.ones(3, 6, dtype=torch.long)
    with torch.no_grad():
        assert relative_error(routed(tokens, modality_ids=ids), dense(tokens)) <= 1e-5
        before = routed(tokens, modality_ids=ids)
        routed.get_parameter("layers.0.delayed.bias")[1].add_(0.3)   # every token is modality 1
        after_1 = routed(tokens, modality_ids=ids)
        routed.get_parameter("layers.0.delayed.bias")[0].add_(0.3)
        after_0 = routed(tokens, modality_ids=ids)
    moved_1 = (after_1 - before).abs().amax(-1) > 1e-6
    moved_0 = (after_0 - after_1).abs().amax(-1) > 1e-6
    assert not moved_1[:, 0].any() and moved_1[:, 1:].all()   # position 0 holds the zero state's projection
    assert moved_0[:, 0].all() and not moved_0[:, 1:].any()

    # `out` runs on the shifted sequence: position 0 (the zero state's) by modality 0, position t by token t-1's
    uses = next(p.uses for p in routed.plan.params if p.fqn == "layers.0.out.weight")
    assert uses == ["linear_weight in aten.linear.default, batch dim 0, seq dim 1 (1 position without a token, "
                    "tokens[:-1]); [M, out, in] stacked"], uses
    ids = torch.tensor([[0, 1, 1, 0, 2, 1], [1, 0, 2, 2, 0, 1], [2, 2, 2, 2, 2, 2]])
    with torch.no_grad():
        before = routed(tokens, modality_ids=ids)
        routed.get_parameter("layers.0.out.bias")[1].add_(0.3)
        moved = (routed(tokens, modality_ids=ids) - before).abs().amax(-1) > 1e-6
    assert torch.equal(moved[:, 1:], ids[:, :-1] == 1) and not moved[:, 0].any()

    with pytest.raises(sparsify.RoutingError, match=r"layers\.0\.start\.weight: .*only modality 0's copy"):
        sparsify.convert(DelayedState(), 3, example_inputs=example, include=r"start")


def test_a_learned_prompt_before_the_tokens_is_routed_as_modality_0_and_the_tokens_by_their_own():
    """CPM-Ant's prompt (tests/toy_models.LearnedPrompt): the block runs over a sequence laid out as 3 prompt
    positions then the tokens; routed with ids laid out the same way (modality 0 for the prompt). fp32."""
    torch.manual_seed(0)
    dense = LearnedPrompt().eval()
    routed = sparsify.convert(dense, 3, example_inputs=(torch.randint(0, 50, (2, 7)),), policy="mot")
    assert set(routed.plan.routed) == {f"layers.0.{name}.{kind}" for name in ("norm", "up", "down")
                                       for kind in ("weight", "bias")}
    assert all("(3 positions without a token, tokens[:])" in use for p in routed.plan.params for use in p.uses)
    tokens, ids = torch.randint(0, 50, (3, 5)), torch.tensor([[0, 1, 2, 0, 1], [2, 2, 0, 1, 0], [1] * 5])
    with torch.no_grad():
        assert relative_error(routed(tokens, modality_ids=ids), dense(tokens)) <= 1e-5
        before = routed(tokens, modality_ids=ids)
        for fqn in routed.plan.routed:
            routed.get_parameter(fqn)[1].add_(0.3)
        moved = (routed(tokens, modality_ids=ids) - before).abs().amax(-1) > 1e-6
    assert torch.equal(moved, ids == 1)   # the block is token-wise: modality 1's tokens, and only those


def test_a_predicting_stream_as_long_as_the_sequence_is_routed_as_modality_0():
    """ProphetNet's n-gram stream (tests/toy_models.PredictingStreams): the block runs over the tokens then a
    stream of as many positions no token went into; routed with ids laid out the same way (modality 0 for the
    stream), the stream's own projection (chunked off) with modality 0's copy. fp32, 1e-5 relative."""
    torch.manual_seed(0)
    dense = PredictingStreams().eval()
    routed = sparsify.convert(dense, 3, example_inputs=(torch.randint(0, 50, (2, 7)),), policy="mot")
    assert set(routed.plan.routed) == {f"{name}.{kind}" for name in ("norm", "q", "k", "v", "out", "up", "down")
                                       for kind in ("weight", "bias")}
    uses = {p.fqn: p.uses for p in routed.plan.params}
    assert all("(tokens[:], as many positions without a token as the sequence has)" in use
               for use in uses["q.weight"] + uses["up.weight"]), uses["q.weight"]
    assert sorted("no token: modality 0's copy" in use for use in uses["out.weight"]) == [False, True]

    tokens = torch.randint(0, 50, (3, 5))
    for ids in (torch.tensor([[0, 1, 2, 0, 1], [2, 2, 0, 1, 0], [1] * 5]), torch.ones(3, 5, dtype=torch.long)):
        with torch.no_grad():
            assert relative_error(routed(tokens, modality_ids=ids), dense(tokens)) <= 1e-5
    with torch.no_grad():   # every token modality 1: its copies move the main stream, modality 0's the stream
        before = routed(tokens, modality_ids=ids)
        routed.get_parameter("up.bias")[1].add_(0.3)
        after_1 = routed(tokens, modality_ids=ids)
        routed.get_parameter("up.bias")[0].add_(0.3)
        after_0 = routed(tokens, modality_ids=ids)
    moved_1 = (after_1 - before).abs().amax(-1) > 1e-6
    moved_0 = (after_0 - after_1).abs().amax(-1) > 1e-6
    assert moved_1[:, :5].all() and not moved_1[:, 5:].any()
    assert moved_0[:, 5:].all() and not moved_0[:, :5].any()


def test_query_rows_that_pick_positions_are_routed_by_the_picked_tokens():
    """XLNet's query stream (tests/toy_models.QueryStream): rows mapped from the sequence by a [B, rows, T]
    input of one-hot rows are routed by the modality of the token each row picks. fp32, 1e-5 relative."""
    torch.manual_seed(0)
    dense = QueryStream().eval()

    def targets(picked, length):
        return F.one_hot(picked, length).float()

    example = (torch.randint(0, 50, (2, 7)), targets(torch.tensor([[6, 2], [0, 3]]), 7))
    routed = sparsify.convert(dense, 3, example_inputs=example, policy="mot")
    assert {"up.weight", "down.bias", "norm.weight", "mix.weight"} <= set(routed.plan.routed)
    uses = {p.fqn: p.uses for p in routed.plan.params}
    assert "(the positions that the rows of input 'targets' pick)" in uses["up.weight"][0], uses["up.weight"]

    tokens, ids = torch.randint(0, 50, (3, 5)), torch.tensor([[0, 1, 2, 0, 1], [2, 2, 0, 1, 0], [1] * 5])
    picks = targets(torch.tensor([[1, 0], [3, 2], [4, 0]]), 5)
    with torch.no_grad():
        assert relative_error(routed(tokens, picks, modality_ids=ids), dense(tokens, picks)) <= 1e-5
        before = routed(tokens, picks, modality_ids=ids)
        routed.get_parameter("down.bias")[1].add_(0.3)
        moved = (routed(tokens, picks, modality_ids=ids) - before).abs().amax(-1) > 1e-6
    assert torch.equal(moved, torch.tensor([[True, False], [True, False], [True, True]]))
