import pytest
import torch

import sparsify
from tests.toy_models import ToyLM


def example():
    return (torch.randint(0, 50, (2, 7)),)


def test_independent_init_reinitialises_routed_copies_only():
    torch.manual_seed(0)
    model = ToyLM().eval()
    routed = sparsify.convert(model, 3, example_inputs=example(), init="independent", policy="none",
                              include=r"layers\.\d+\.(up|norm)\.", exclude=r"up\.bias")
    assert routed.verify_report.ok
    weight = routed.get_parameter("layers.0.up.weight")
    assert not torch.equal(weight[0], weight[1]) and not torch.equal(weight[0], model.layers[0].up.weight)
    # a shared parameter of a re-initialised module keeps its dense value
    assert torch.equal(routed.get_parameter("layers.0.up.bias"), model.layers[0].up.bias)


def test_independent_init_needs_a_way_to_reinitialise():
    with pytest.raises(sparsify.SparsifyError, match=r"cannot re-initialise module 'layers.0' \(Block\).*init='copy'"):
        sparsify.convert(ToyLM(), 2, example_inputs=example(), init="independent", policy="mot")
