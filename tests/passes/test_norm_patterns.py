"""Norms in every spelling (norm_patterns.py) and parameters used through views, routed under the presets.

Each toy block is token-wise (norm -> linear -> residual), so a token's output depends on its own modality only:
perturbing modality 1's copies must change exactly the modality-1 tokens. fp32, tolerance 1e-5 relative.
"""
import pytest
import torch
import torch.nn as nn
from torch.testing import FileCheck

import sparsify
from sparsify.capture import capture
from sparsify.passes.norm_patterns import find_norms

EPS = 1e-6


class RsqrtRMSNorm(nn.Module):  # Llama: fp32 statistics, cast back before the scale
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
        return self.weight * h.to(x.dtype)


class DivSqrtRMSNorm(RsqrtRMSNorm):
    def forward(self, x):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * self.weight


class ReciprocalSqrtRMSNorm(RsqrtRMSNorm):
    def forward(self, x):
        return self.weight * (x * (1.0 / torch.sqrt(torch.mean(x * x, dim=-1, keepdim=True) + EPS)))


class ScaleThenCastRMSNorm(RsqrtRMSNorm):  # the cast after the scale
    def forward(self, x):
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * self.weight).to(x.dtype)


class PowRMSNorm(RsqrtRMSNorm):  # Gemma 3n / Gemma 4: torch.pow(ms + eps, -0.5), scale in fp32, cast after
    def forward(self, x):
        h = x.float()
        return (h * torch.pow(h.pow(2).mean(-1, keepdim=True) + EPS, -0.5) * self.weight.float()).type_as(x)


class ReciprocalPowRMSNorm(RsqrtRMSNorm):
    def forward(self, x):
        return self.weight * (x * (1 / (EPS + x.pow(2).mean(-1, keepdim=True)) ** 0.5))


class DivPowRMSNorm(RsqrtRMSNorm):
    def forward(self, x):
        return x / (x.pow(2).mean(-1, keepdim=True) + EPS) ** 0.5 * self.weight


class DecomposedLayerNorm(nn.Module):
    def __init__(self, d, variance="mean_pow"):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.bias = nn.Parameter(0.1 * torch.randn(d))
        self.variance = variance

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        if self.variance == "var":
            var = x.var(-1, keepdim=True, unbiased=False)
        else:
            var = ((x - mean) ** 2).mean(-1, keepdim=True)  # x - mean written twice: canonicalize merges them
        if self.variance == "pow_neg_half":
            return (x - mean) * torch.pow(var + 1e-5, -0.5) * self.weight + self.bias
        return (x - mean) / torch.sqrt(var + 1e-5) * self.weight + self.bias


class ClampedRMSNorm(RsqrtRMSNorm):  # a spelling no pattern has: eps as a clamp, not an addition
    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).clamp_min(EPS)))


class Block(nn.Module):
    def __init__(self, norm, d=8):
        super().__init__()
        self.norm, self.up, self.down = norm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Stack(nn.Module):
    def __init__(self, norm, d=8, vocab=30):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Block(norm, d), Block(norm, d)])

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return x


def routed_code(routed):
    (entry,) = [e for entries in routed._graphs.values() for e in entries]
    return entry.routed.graph_module.code


def assert_routing_is_real(routed, tokens):
    ids = torch.tensor([[0, 1, 2, 1, 0, 0, 2], [1, 1, 0, 2, 2, 0, 1]])
    with torch.no_grad():
        before = routed(tokens, modality_ids=ids)
        for fqn in routed.plan.routed:
            routed.get_parameter(fqn)[1].mul_(1.5).add_(0.1)
        after = routed(tokens, modality_ids=ids)
    changed = (after - before).abs().amax(-1) > 1e-4
    assert torch.equal(changed, ids == 1)
    assert torch.equal(after[ids != 1], before[ids != 1])


RMS_SPELLINGS = [nn.RMSNorm, RsqrtRMSNorm, DivSqrtRMSNorm, ReciprocalSqrtRMSNorm, ScaleThenCastRMSNorm, PowRMSNorm,
                 ReciprocalPowRMSNorm, DivPowRMSNorm]


@pytest.mark.parametrize("norm", RMS_SPELLINGS, ids=lambda n: n.__name__)
def test_every_rms_norm_spelling_is_routed_as_a_norm_under_mot(norm):
    torch.manual_seed(0)
    dense, tokens = Stack(norm).eval(), torch.randint(0, 30, (2, 7))
    routed = sparsify.convert(dense, 3, policy="mot")
    roles = {p.fqn: p.role for p in routed.plan.params}
    assert roles["layers.0.norm.weight"] == roles["layers.1.norm.weight"] == "norm"
    assert not routed.plan.notes
    assert routed.verify_report.ok and routed.verify_report.max_rel_err <= 1e-5
    with torch.no_grad():
        assert float((routed(tokens, modality_ids=torch.randint(0, 3, (2, 7))) - dense(tokens)).abs().max()
                     / dense(tokens).abs().max()) <= 1e-5
    # one fused op per norm, none of the norm's own arithmetic left
    FileCheck().check_count("torch.ops.sparsify.routed_rms_norm", 2, exactly=True).check_not("sqrt").run(
        routed_code(routed))
    assert_routing_is_real(routed, tokens)


@pytest.mark.parametrize("variance", ["mean_pow", "var", "pow_neg_half"])
def test_decomposed_layer_norm_is_one_routed_layer_norm(variance):
    torch.manual_seed(0)
    dense, tokens = Stack(lambda d: DecomposedLayerNorm(d, variance)).eval(), torch.randint(0, 30, (2, 7))
    routed = sparsify.convert(dense, 3, policy="mot")
    roles = {p.fqn: p.role for p in routed.plan.params}
    assert roles["layers.0.norm.weight"] == roles["layers.0.norm.bias"] == "norm"
    assert routed.verify_report.max_rel_err <= 1e-5
    FileCheck().check_count("torch.ops.sparsify.routed_layer_norm", 2, exactly=True).check_not("sqrt").run(
        routed_code(routed))
    assert_routing_is_real(routed, tokens)


def test_patterns_find_each_spelling_with_its_eps():
    for norm, kind, eps in [(nn.RMSNorm, "rms", torch.finfo(torch.float32).eps), (DivSqrtRMSNorm, "rms", EPS),
                            (DecomposedLayerNorm, "layer", 1e-5)]:
        model = Stack(norm)
        captured = capture(model, {"tokens": torch.randint(0, 30, (2, 5))})
        matches = find_norms(captured.graph_module)
        assert [(m.kind, m.eps) for m in matches] == [(kind, eps)] * 2, norm.__name__
        assert [m.weight.name for m in matches] == ["p_layers_0_norm_weight", "p_layers_1_norm_weight"]


def test_a_norm_no_pattern_knows_is_routed_exactly_and_reported(recwarn):
    torch.manual_seed(0)
    dense, tokens = Stack(ClampedRMSNorm).eval(), torch.randint(0, 30, (2, 7))
    routed = sparsify.convert(dense, 3, policy="mot")
    assert {p.role for p in routed.plan.params if "norm" in p.fqn} == {"norm"}
    assert routed.verify_report.max_rel_err <= 1e-5
    summary = routed.plan.summary()
    assert "layers.0.norm.weight: scales a normalised value in a form no norm pattern matches" in summary
    assert any("no norm pattern matches" in str(w.message) for w in recwarn)
    assert_routing_is_real(routed, tokens)


def test_mot_with_a_norm_left_shared_says_so():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"block layers.0 is routed but its norm parameter layers.0.norm.weight"):
        routed = sparsify.convert(Stack(RsqrtRMSNorm).eval(), 3, policy="mot", exclude=r"layers\.0\.norm")
    assert any("layers.0.norm.weight stays shared (excluded by" in n for n in routed.plan.notes)
    assert "note: block layers.0 is routed" in routed.plan.summary()
    assert sparsify.RoutingPlan.from_json(routed.plan.to_json()).notes == routed.plan.notes


class ViewedParameters(nn.Module):
    """Parameters used through view(-1), reshape, t(), unsqueeze and a dtype cast."""

    def __init__(self, d=6):
        super().__init__()
        self.embed = nn.Embedding(30, d)
        self.flat_scale = nn.Parameter(1 + 0.1 * torch.randn(1, d))   # used as .view(-1)
        self.grid_bias = nn.Parameter(0.1 * torch.randn(2, 3))        # used as .reshape(6)
        self.weight_in_out = nn.Parameter(0.3 * torch.randn(d, d))    # used as .t() in a linear
        self.row = nn.Parameter(0.1 * torch.randn(d))                 # used as .unsqueeze(0)
        self.double_scale = nn.Parameter(1 + 0.1 * torch.randn(d))    # used as .double()

    def forward(self, tokens):
        x = self.embed(tokens) * self.flat_scale.view(-1) + self.grid_bias.reshape(6)
        x = torch.nn.functional.linear(x, self.weight_in_out.t()) + self.row.unsqueeze(0)
        return (x.double() * self.double_scale.double()).float()


def test_parameters_used_through_views_and_casts_route_exactly():
    torch.manual_seed(0)
    dense, tokens = ViewedParameters().eval(), torch.randint(0, 30, (2, 7))
    routed = sparsify.convert(dense, 3, policy="all")
    assert set(routed.plan.routed) == {"flat_scale", "grid_bias", "weight_in_out", "row", "double_scale"}
    assert routed.verify_report.ok and routed.verify_report.max_rel_err <= 1e-5
    assert_routing_is_real(routed, tokens)
