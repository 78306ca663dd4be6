"""Hugging Face Mamba and Mamba2 (slow CPU paths) into Mixture-of-Mamba, 3 modalities, fp32."""
import copy
import os
import subprocess
import sys

import pytest
import torch

import sparsify


def tiny_mamba():
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    config = MambaConfig(num_hidden_layers=2, hidden_size=32, state_size=8, vocab_size=101, intermediate_size=64,
                         conv_kernel=4, use_mambapy=False)
    return MambaForCausalLM(config).eval()


def tiny_mamba2():
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    config = Mamba2Config(num_hidden_layers=2, hidden_size=32, state_size=8, vocab_size=101, expand=2, head_dim=8,
                          num_heads=8, n_groups=1, chunk_size=4, conv_kernel=4)
    return Mamba2ForCausalLM(config).eval()


# The Mixture-of-Mamba set: every mixer's projections (Mamba2 has no x_proj/dt_proj); dt_proj's
# bias is the scan's delta bias and moves with dt_proj.
MOM = {
    "mamba": ["in_proj.weight", "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "out_proj.weight"],
    "mamba2": ["in_proj.weight", "out_proj.weight"],
}
FACTORIES = {"mamba": tiny_mamba, "mamba2": tiny_mamba2}


@pytest.fixture(scope="module", params=sorted(FACTORIES))
def mamba(request):
    dense = FACTORIES[request.param]()
    return request.param, dense, sparsify.convert(dense, modalities=3)


def test_routes_exactly_the_mom_set(mamba):
    name, _, routed = mamba
    expected = {f"backbone.layers.{i}.mixer.{p}" for i in range(2) for p in MOM[name]}
    assert set(routed.plan.routed) == expected
    assert routed.verify_report.ok


@pytest.mark.parametrize("seq", [13, 6, 21])
def test_equals_dense_at_any_sequence_length(mamba, seq):
    _, dense, routed = mamba
    g = torch.Generator().manual_seed(seq)
    x, ids = torch.randint(0, 101, (2, seq), generator=g), torch.randint(0, 3, (2, seq), generator=g)
    with torch.no_grad():
        want = dense(x, use_cache=False).logits
        got = routed(x, modality_ids=ids).logits
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


def test_routing_is_real_and_the_scan_carries_it_forward(mamba):
    _, _, routed = mamba
    routed = copy.deepcopy(routed)
    x = torch.randint(0, 101, (1, 12), generator=torch.Generator().manual_seed(0))
    ids = torch.zeros(1, 12, dtype=torch.long)
    ids[0, 6] = 2
    with torch.no_grad():
        before = routed(x, modality_ids=ids).logits
        text_only = routed(x, modality_ids=torch.zeros_like(ids)).logits
        for fqn in routed.plan.routed:
            p = routed.get_parameter(fqn)[2]
            p.add_(0.3 * torch.randn_like(p))
        after = routed(x, modality_ids=ids).logits
        text_only_after = routed(x, modality_ids=torch.zeros_like(ids)).logits
    assert torch.equal(text_only, text_only_after)
    assert torch.equal(before[:, :6], after[:, :6])          # before the modality-2 token: unchanged
    changed = (before - after).abs().amax(-1)[0]
    assert bool((changed[6:] > 1e-5).all())                     # at it and after it: changed


def test_gradients_reach_each_copy_from_its_own_tokens(mamba):
    _, dense, routed = mamba
    routed, dense = copy.deepcopy(routed), copy.deepcopy(dense)
    g = torch.Generator().manual_seed(2)
    x, ids = torch.randint(0, 101, (2, 9), generator=g), torch.randint(0, 2, (2, 9), generator=g)
    weights = torch.randn(2, 9, 101, generator=g)
    (routed(x, modality_ids=ids).logits * weights).sum().backward()
    (dense(x, use_cache=False).logits * weights).sum().backward()
    for fqn in routed.plan.routed:
        grad = routed.get_parameter(fqn).grad
        assert torch.count_nonzero(grad[2]) == 0, fqn
        assert grad[0].abs().max() > 0 and grad[1].abs().max() > 0, fqn
        dense_grad = dense.get_parameter(fqn).grad  # fp32: summation order differs, so bound by its scale
        assert float((grad.sum(0) - dense_grad).abs().max()) <= 1e-4 * float(dense_grad.abs().max()), fqn


def test_each_projection_can_be_left_shared():
    routed = sparsify.convert(tiny_mamba(), 2, exclude=r"\.x_proj\.", verify=False)
    assert not any(".x_proj." in fqn for fqn in routed.plan.routed)
    assert any(".dt_proj." in fqn for fqn in routed.plan.routed)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_policy_all_routes_the_causal_conv1d_per_output_token(name):
    dense = FACTORIES[name]()
    routed = sparsify.convert(dense, 2, policy="all")
    conv = [fqn for fqn in routed.plan.routed if ".conv1d." in fqn]
    assert len(conv) == 4 and routed.verify_report.ok  # weight and bias of both layers
    x = torch.randint(0, 101, (2, 10), generator=torch.Generator().manual_seed(0))
    ids = torch.zeros(2, 10, dtype=torch.long)
    ids[:, 4] = 1
    with torch.no_grad():
        before = routed(x, modality_ids=ids).logits
        for fqn in conv:
            routed.get_parameter(fqn)[1].add_(0.5)
        after = routed(x, modality_ids=ids).logits
    changed = (before - after).abs().amax(-1)
    assert bool((changed[:, :4] == 0).all()) and bool((changed[:, 4] > 1e-3).all())


def test_train_mode_matches_dense_train_mode(mamba):
    """In train mode transformers calls mamba_ssm's fused mixer kernels when mamba_ssm imports; on CPU
    those take sparsify's PyTorch paths, and the routed model (captured in train mode) agrees."""
    _, dense, routed = mamba
    dense, routed = copy.deepcopy(dense).train(), copy.deepcopy(routed).train()
    g = torch.Generator().manual_seed(5)
    x, ids = torch.randint(0, 101, (2, 10), generator=g), torch.randint(0, 3, (2, 10), generator=g)
    want = dense(x, use_cache=False).logits
    got = routed(x, modality_ids=ids).logits
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5
    got.sum().backward()
    assert all(routed.get_parameter(f).grad is not None for f in routed.plan.routed)


def test_without_mamba_ssm_the_scan_is_still_one_op_and_one_graph_serves_every_length():
    # Without mamba_ssm transformers runs its own scan, a Python loop over time that export would unroll
    # for one length. The transformers frontend makes it the sparsify scan op while capturing (and puts
    # transformers' function back afterwards): one graph for every length, equal to the dense model.
    code = """
import sys
sys.modules["mamba_ssm"] = None  # as if it were not installed
import torch, sparsify
from transformers.models.mamba import modeling_mamba
from transformers.utils.import_utils import is_mamba_ssm_available
from tests.test_convert_mamba_hf import tiny_mamba
assert not is_mamba_ssm_available()
original_scan = modeling_mamba.mamba_selective_scan
dense = tiny_mamba()
routed = sparsify.convert(dense, modalities=3)
assert modeling_mamba.mamba_selective_scan is original_scan
errors = []
for seq in (5, 9, 5):
    x, ids = torch.randint(0, 101, (2, seq)), torch.randint(0, 3, (2, seq))
    with torch.no_grad():
        got, want = routed(x, modality_ids=ids).logits, dense(x, use_cache=False).logits
    errors.append(float((got - want).abs().max() / want.abs().max()))
graphs = [e for entries in routed._graphs.values() for e in entries]
scans = sum(n.target == torch.ops.sparsify.selective_scan.default for n in graphs[0].routed.graph_module.graph.nodes)
print(len(graphs), scans, max(errors))
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    graphs, scans, max_error = result.stdout.split()[-3:]
    assert graphs == "1"  # captured at 13 tokens, reused at 5 and 9
    assert scans == str(tiny_mamba().config.num_hidden_layers)  # one scan op per layer, no loop over time
    assert float(max_error) <= 1e-5
