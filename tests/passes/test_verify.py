import importlib

import torch

import sparsify
from tests.toy_models import ToyLM


def test_verify_names_the_first_divergent_node():
    torch.manual_seed(0)
    model = ToyLM().eval()
    tokens = torch.randint(0, 50, (2, 7))
    routed = sparsify.convert(model, 3, example_inputs=(tokens,), policy="mot")
    report = sparsify.verify(model, routed)
    assert report.ok and report.max_rel_err <= 1e-5 and report.first_divergent_node is None
    with torch.no_grad():
        weight = routed.get_parameter("layers.1.up.weight")[2]
        weight.add_(torch.randn_like(weight))  # not a constant: LayerNorm output sums to zero
    report = sparsify.verify(model, routed)
    assert not report.ok and report.max_rel_err > 1e-3
    # layer 0 still matches; the first mismatch is layer 1's up projection, now a routed_linear
    assert "layers.1.up" in report.first_divergent_node
    assert "routed_linear" in report.first_divergent_node
    assert "MISMATCH" in str(report)


def test_convert_raises_when_verification_fails(monkeypatch):
    module = importlib.import_module("sparsify.ops.routed_linear")  # the file, not the op it exports

    torch.manual_seed(0)
    model = ToyLM().eval()
    reference = module.routed_linear_ref
    monkeypatch.setattr(module, "routed_linear_ref", lambda x, ids, w, b: reference(x, ids, w, b) * 1.01)
    try:
        sparsify.convert(model, 2, example_inputs=(torch.randint(0, 50, (2, 7)),))
    except sparsify.VerificationError as e:
        assert not e.report.ok and e.report.first_divergent_node
    else:
        raise AssertionError("convert accepted a routed model that differs from the dense one")
