import re

import pytest
import torch

import sparsify
from sparsify.capture import capture
from sparsify.plan import RoutingPlan, build_plan
from tests.toy_models import AttentionThenExperts, Hybrid, ToyLM


@pytest.fixture(scope="module")
def captured_toy():
    torch.manual_seed(0)
    model = ToyLM().eval()
    return model, capture(model, {"tokens": torch.randint(0, 50, (2, 7))})


def block_params(layer, names):
    return {f"layers.{layer}.{n}" for n in names}


MOT = ["norm.weight", "norm.bias", "rms.weight", "up.weight", "up.bias", "conv1d_weight", "conv1d_bias", "left"]


def test_presets_pick_by_graph_role_and_block(captured_toy):
    model, captured = captured_toy
    plan = lambda **kw: set(build_plan(captured, model, 3, **kw).routed)  # noqa: E731
    mot = block_params(0, MOT) | block_params(1, MOT)
    assert plan(policy="mot") == mot
    linears = {p for p in mot if "norm" not in p and "rms" not in p}
    assert plan(policy="mom") == linears
    assert plan(policy="auto") == linears  # no attention in these blocks: the Mixture-of-Mamba choice
    assert plan(policy="all") == mot | {"layers.0.shift", "layers.1.shift", "head.weight"}
    assert plan(policy="none") == set()


def test_include_adds_and_exclude_removes(captured_toy):
    model, captured = captured_toy
    plan = build_plan(captured, model, 3, policy="mot", include=r"\.shift$", exclude=r"\.left$|layers\.1\.")
    assert set(plan.routed) == (block_params(0, MOT) - {"layers.0.left"}) | {"layers.0.shift"}
    reasons = {p.fqn: p.reason for p in plan.shared}
    assert "excluded" in reasons["layers.0.left"]
    assert "embedding" in reasons["embed.weight"]


def test_roles_and_token_dims_are_recorded(captured_toy):
    model, captured = captured_toy
    plan = build_plan(captured, model, 2, policy="all")
    by_fqn = {p.fqn: p for p in plan.params}
    assert by_fqn["layers.0.up.weight"].role == "linear"
    assert by_fqn["layers.0.rms.weight"].role == "norm"          # an RMSNorm scale (mul after rsqrt)
    assert by_fqn["layers.0.shift"].role == "elementwise"
    assert "tokens flattened in dim 0" in by_fqn["layers.0.conv1d_weight"].uses[0]
    # w @ x routes x.mT, whose tokens are [batch, seq, d_in] again
    assert by_fqn["layers.0.left"].uses[0] == ("matmul_weight_left in aten.matmul.default, batch dim 0, seq dim 1; "
                                               "[M, out, in] stacked, x transposed")
    assert by_fqn["layers.0.up.weight"].shape == [12, 8]


def test_plan_json_round_trip_and_bad_json(captured_toy):
    model, captured = captured_toy
    plan = build_plan(captured, model, 3, policy="mot", exclude="left")
    assert RoutingPlan.from_json(plan.to_json()) == plan
    with pytest.raises(sparsify.SparsifyError, match="not a valid RoutingPlan"):
        RoutingPlan.from_dict({"modalities": 3, "params": [{"nope": 1}]})


@pytest.mark.parametrize("kwargs,message", [
    (dict(policy="moe"), "unknown policy 'moe'"),
    (dict(init="zeros"), "unknown init 'zeros'"),
    (dict(modalities=0), "modalities must be a positive int"),
    (dict(include="("), "not a valid regular expression"),
])
def test_bad_options(captured_toy, kwargs, message):
    model, captured = captured_toy
    options = dict(modalities=3) | kwargs
    with pytest.raises(sparsify.SparsifyError, match=message):
        build_plan(captured, model, **options)


def test_auto_routes_attention_blocks_as_mot_and_others_as_mom():
    torch.manual_seed(0)
    model = Hybrid().eval()
    captured = capture(model, {"tokens": torch.randint(0, 50, (2, 7))})
    routed = set(build_plan(captured, model, 2, policy="auto").routed)
    attention = {f"layers.0.{n}" for n in ["norm.weight", "norm.bias", "qkv.weight", "qkv.bias", "out.weight",
                                          "out.bias"]}
    no_attention = {f"layers.1.{n}" for n in ["up.weight", "up.bias", "conv1d_weight", "conv1d_bias", "left"]}
    assert routed == attention | no_attention


@pytest.mark.parametrize("seq", [7, 1])  # 1: export specialises the length, the rule must still hold
def test_auto_tells_attention_softmax_from_an_expert_router_softmax(seq):
    torch.manual_seed(0)
    model = AttentionThenExperts().eval()
    captured = capture(model, {"tokens": torch.randint(0, 50, (2, seq))})
    routed = set(build_plan(captured, model, 2, policy="auto").routed)
    assert {"layers.0.norm.weight", "layers.0.norm.bias"} <= routed        # attention block: mot, norms too
    assert "layers.1.router.weight" in routed and "layers.1.experts.0.weight" in routed
    assert not {"layers.1.norm.weight", "layers.1.norm.bias"} & routed     # router block: mom, norms shared


def test_summary_reports_parameters_per_modality_and_unchanged_compute(captured_toy):
    model, captured = captured_toy
    plan = build_plan(captured, model, 3, policy="mot")
    dense_total = sum(p.numel() for p in model.parameters())
    own = sum(model.get_parameter(fqn).numel() for fqn in plan.routed)
    summary = plan.summary()
    assert f"per modality: {own:,} routed parameters of its own + {dense_total - own:,} shared = {dense_total:,}" \
        in summary
    def flops(text):
        return int(re.search(r"~([\d,]+) FLOPs in linear layers", text).group(1).replace(",", ""))

    assert flops(summary) > 0 and flops(summary) == flops(build_plan(captured, model, 3, policy="none").summary())
    assert f"parameters: dense {dense_total:,} -> routed {dense_total + 2 * own:,}" in summary


def _static_and_dynamic_captures(model, inputs):
    return capture(model, inputs, static=True), capture(model, inputs)


def _without_node_names(plan) -> str:
    """The plan as JSON, the names of graph nodes in its notes taken out: a dynamic graph holds more nodes
    (size arithmetic), so the same op may be mul_13 there and mul_10 in the static graph."""
    return re.sub(r"node '[^']+'", "node '?'", plan.to_json())


def _families():
    from tests.conftest import tiny_gpt2, tiny_llama
    from tests.test_convert_hybrid_families import bamba, jamba
    from tests.test_convert_mamba_hf import tiny_mamba, tiny_mamba2
    from tests.test_convert_mamba_ssm import lm

    return {"gpt2": tiny_gpt2, "llama": tiny_llama, "hf_mamba": tiny_mamba, "hf_mamba2": tiny_mamba2,
            "jamba": jamba, "bamba": bamba, "mamba_ssm_mamba2": lambda: lm("Mamba2")}


@pytest.mark.parametrize("family", ["gpt2", "llama", "hf_mamba", "hf_mamba2", "jamba", "bamba", "mamba_ssm_mamba2"])
def test_a_static_capture_plans_what_the_dynamic_capture_plans(family):
    """The CLI plans from a static capture (less than half the export time): for every family the plan,
    under each policy, is the dynamic capture's, and no use needed sizes to find its tokens (so the CLI
    keeps the static plan)."""
    from sparsify.api import _example_inputs

    model = _families()[family]().eval()
    inputs = _example_inputs(model, None, None)
    static_capture, dynamic_capture = _static_and_dynamic_captures(model, inputs)
    for policy in ("auto", "all"):
        static_plan = build_plan(static_capture, model, 3, policy=policy)
        assert _without_node_names(static_plan) == _without_node_names(build_plan(dynamic_capture, model, 3,
                                                                                   policy=policy))
        assert not any(u.axes_from_sizes for uses in static_capture.param_uses.values() for u in uses)


class RepeatThenLinear(torch.nn.Module):
    """Tokens through an op token provenance has no rule for (a repeat that changes the shape): sizes decide
    the linear's token axes. At a static length of 4 the width after the repeat (4) is a second candidate."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

    def forward(self, x):
        return self.layers[0](x.repeat(1, 1, 2))


def test_the_cli_plans_again_from_the_dynamic_capture_where_sizes_decided_a_use(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    import sparsify.convert_checkpoint as convert_checkpoint

    captures = []
    real_capture = convert_checkpoint.capture
    monkeypatch.setattr(convert_checkpoint, "capture",
                        lambda *a, static=False, **k: captures.append(static) or real_capture(*a, static=static, **k))
    model = RepeatThenLinear()
    save_file(model.state_dict(), tmp_path / "dense.safetensors")
    factory = lambda: (RepeatThenLinear(), (torch.randn(2, 4, 2),))  # noqa: E731
    source = convert_checkpoint.open_source(tmp_path / "dense.safetensors")
    plan, _, _ = convert_checkpoint.plan_for(source, factory, 3, "all", None, None, "copy")
    assert captures == [True, False]
    static, dynamic = _static_and_dynamic_captures(model, {"x": torch.randn(2, 4, 2)})
    dynamic_plan = build_plan(dynamic, model, 3, policy="all")
    build_plan(static, model, 3, policy="all")  # analyses the static graph's uses (static.param_uses)
    assert _without_node_names(plan) == _without_node_names(dynamic_plan) and "layers.0.weight" in plan.routed
    assert any(u.axes_from_sizes for uses in static.param_uses.values() for u in uses)
    captures.clear()
    toy = ToyLM()
    save_file(toy.state_dict(), tmp_path / "toy.safetensors")
    convert_checkpoint.plan_for(convert_checkpoint.open_source(tmp_path / "toy.safetensors"),
                                lambda: (ToyLM(), (torch.randint(0, 50, (2, 7)),)), 3, "auto", None, None, "copy")
    assert captures == [True]  # provenance found every use's tokens: the static capture's plan is kept
