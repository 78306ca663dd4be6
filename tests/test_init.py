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


def test_convert_leaves_the_global_random_stream_alone():
    """In a fresh process (the first capture traces sparsify's norm patterns): a convert with init='copy' draws
    nothing from torch's global generator, so init='independent' of a later model and the user's own random
    numbers do not depend on what ran before in the process (the training demo's seeds did)."""
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import torch, sparsify\n"
        "from tests.conftest import tiny_llama\n"
        "model = tiny_llama()\n"
        "torch.manual_seed(5); want = torch.rand(4)\n"
        "torch.manual_seed(5); sparsify.convert(model, modalities=2); got = torch.rand(4)\n"
        "print(torch.equal(got, want))\n")
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=repo, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "True"
