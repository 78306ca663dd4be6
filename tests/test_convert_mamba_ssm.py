"""mamba_ssm models on CPU: the import works without the CUDA extension, the scans match mamba_ssm's
references, and Mamba1/Mamba2 mixers convert to Mixture-of-Mamba (3 modalities, fp32)."""
import copy
import subprocess
import sys

import pytest
import torch

import sparsify  # installs the mamba_ssm hook before mamba_ssm is imported

from mamba_ssm.models.config_mamba import MambaConfig  # noqa: E402
from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel  # noqa: E402
from mamba_ssm.modules.mamba_simple import Mamba  # noqa: E402
from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete  # noqa: E402
from mamba_ssm.ops.selective_scan_interface import selective_scan_ref  # noqa: E402

from sparsify.ops.selective_scan import selective_scan_ref as our_selective_scan  # noqa: E402
from sparsify.ops.ssd_scan import ssd_scan_ref  # noqa: E402


def test_import_mamba_ssm_works_after_import_sparsify():
    code = ("import sparsify, mamba_ssm, selective_scan_cuda, importlib.machinery as m; "
            "print(mamba_ssm.__version__, m.PathFinder.find_spec('selective_scan_cuda') is None, "
            "getattr(selective_scan_cuda, '__sparsify_stand_in__', False))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    version, missing, stand_in = result.stdout.split()
    assert stand_in == missing  # the stand-in is used exactly when the real extension is missing


@pytest.mark.parametrize("grouped,with_extras,length", [(False, True, 11), (True, False, 11), (False, False, 11),
                                                        (False, True, 1), (True, True, 50), (False, True, 64)])
def test_selective_scan_matches_mamba_ssm_reference(grouped, with_extras, length):
    # The CPU op's chunks are ~sqrt(length) long: 11 and 50 leave a partial last chunk, 64 none, 1 is one step.
    g = torch.Generator().manual_seed(0)
    b, d, n = 2, 6, 4
    u, delta = torch.randn(b, d, length, generator=g), 0.5 * torch.randn(b, d, length, generator=g)
    A = -torch.rand(d, n, generator=g)
    shape = (b, 2, n, length) if grouped else (b, n, length)
    B, C = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    extras = dict(D=torch.randn(d, generator=g), z=torch.randn(b, d, length, generator=g),
                  delta_bias=torch.randn(d, generator=g), delta_softplus=True) if with_extras else {}
    inputs = [u, delta, A, B, C]
    ours_in = [t.clone().requires_grad_() for t in inputs]
    theirs_in = [t.clone().requires_grad_() for t in inputs]
    ours = torch.ops.sparsify.selective_scan(*ours_in, extras.get("D"), extras.get("z"), extras.get("delta_bias"),
                                             extras.get("delta_softplus", False))
    theirs = selective_scan_ref(*theirs_in, **extras)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(ours.shape, generator=g)
    for a, b_ in zip(torch.autograd.grad(ours, ours_in, upstream), torch.autograd.grad(theirs, theirs_in, upstream)):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-5)
    # the step-by-step reference (what generation's prefill calls) agrees with the op to float rounding
    torch.testing.assert_close(our_selective_scan(u, delta, A, B, C, **extras), ours.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("length", [1, 11, 50])
def test_selective_scan_with_state_matches_mamba_ssm_reference(length):
    # the prefill of generation: the output and the final state, forward and backward through both
    g = torch.Generator().manual_seed(3)
    b, d, n = 2, 6, 4
    tensors = [torch.randn(b, d, length, generator=g), 0.5 * torch.randn(b, d, length, generator=g),
               -torch.rand(d, n, generator=g), torch.randn(b, n, length, generator=g),
               torch.randn(b, n, length, generator=g), torch.randn(d, generator=g),
               torch.randn(b, d, length, generator=g), torch.randn(d, generator=g)]
    ours_in = [t.clone().requires_grad_() for t in tensors]
    theirs_in = [t.clone().requires_grad_() for t in tensors]
    y, last = torch.ops.sparsify.selective_scan_with_state(*ours_in, True)
    y_ref, last_ref = selective_scan_ref(*theirs_in[:5], D=theirs_in[5], z=theirs_in[6], delta_bias=theirs_in[7],
                                         delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, last_ref.float(), rtol=1e-5, atol=1e-5)
    upstream = (torch.randn(y.shape, generator=g), torch.randn(last.shape, generator=g))
    ours = torch.autograd.grad((y, last), ours_in, upstream)
    theirs = torch.autograd.grad((y_ref, last_ref), theirs_in, upstream)
    for a, b_ in zip(ours, theirs):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("length,groups", [(16, 3), (13, 1), (1, 1), (150, 3), (128, 1)])
def test_ssd_scan_matches_ssd_minimal(length, groups):
    # forward and backward against mamba_ssm's minimal SSD (one block of the whole length); the CPU op scans in
    # chunks of CPU_CHUNK (64): 13 is one partial chunk, 150 two whole ones and a partial one, 128 two whole
    # ones (the recurrence across chunks); groups=1 shares B and C across heads
    g = torch.Generator().manual_seed(1)
    b, h, p, n = 2, 3, 4, 5
    x = torch.randn(b, length, h, p, generator=g)
    dt = torch.rand(b, length, h, generator=g) * 0.5
    A = -torch.rand(h, generator=g)
    B, C = torch.randn(b, length, groups, n, generator=g), torch.randn(b, length, groups, n, generator=g)
    ours_in = [t.clone().requires_grad_() for t in (x, dt, A, B, C)]
    theirs_in = [t.clone().requires_grad_() for t in (x, dt, A, B, C)]
    tx, tdt, tA, tB, tC = theirs_in
    theirs, _ = ssd_minimal_discrete(tx * tdt[..., None], tA * tdt, tB.repeat_interleave(h // groups, 2),
                                     tC.repeat_interleave(h // groups, 2), block_len=length)
    ours = torch.ops.sparsify.ssd_scan(*ours_in, None, None, None, False, 0.0, float("inf"))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    upstream = torch.randn(ours.shape, generator=g)
    for a, b_ in zip(torch.autograd.grad(ours, ours_in, upstream), torch.autograd.grad(theirs, theirs_in, upstream)):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ssd_scan_ref(x, dt, A, B, C), ours.detach(), rtol=1e-5, atol=1e-6)


def test_ssd_scan_cpu_backward_work_grows_linearly_with_the_chunks():
    """The recurrence across chunks takes each chunk's tensors from one unbind: indexing chunk c inside the loop
    gave the backward one zero-filled copy of the whole chunk-state tensor per chunk (quadratic: at length 4096,
    32 heads of 64, state 128, most of the fwd+bwd time). Six more chunks add six steps of the recurrence to
    the autograd graph (a multiply and an add each), nothing else."""
    from collections import Counter

    from sparsify.ops.ssd_scan import CPU_CHUNK, ssd_scan_cpu

    def graph_nodes(length):
        g = torch.Generator().manual_seed(3)
        x = torch.randn(1, length, 2, 3, generator=g, requires_grad=True)
        y = ssd_scan_cpu(x, torch.rand(1, length, 2, generator=g), -torch.rand(2, generator=g),
                         torch.randn(1, length, 1, 4, generator=g), torch.randn(1, length, 1, 4, generator=g))
        seen, todo = set(), [y.grad_fn]
        while todo:
            node = todo.pop()
            if node is not None and node not in seen:
                seen.add(node)
                todo += [next_node for next_node, _ in node.next_functions]
        return Counter(type(node).__name__ for node in seen)

    assert graph_nodes(8 * CPU_CHUNK) - graph_nodes(2 * CPU_CHUNK) == Counter(MulBackward0=6, AddBackward0=6)


@pytest.mark.parametrize("per_channel_D", [False, True])
def test_ssd_scan_op_matches_step_reference_with_gate_bias_and_limits(per_channel_D):
    g = torch.Generator().manual_seed(2)
    b, length, h, p, n = 2, 150, 4, 3, 5  # two whole chunks of the CPU scan and a partial one
    tensors = [torch.randn(b, length, h, p, generator=g), torch.randn(b, length, h, generator=g),
               -torch.rand(h, generator=g), torch.randn(b, length, 2, n, generator=g),
               torch.randn(b, length, 2, n, generator=g), torch.randn(*((h, p) if per_channel_D else (h,)), generator=g),
               torch.randn(b, length, h, p, generator=g), torch.randn(h, generator=g)]
    options = (True, 0.05, 2.0)  # softplus, then clamp to [0.05, 2]: some steps are clamped
    ours_in = [t.clone().requires_grad_() for t in tensors]
    theirs_in = [t.clone().requires_grad_() for t in tensors]
    ours = torch.ops.sparsify.ssd_scan(*ours_in, *options)
    theirs = ssd_scan_ref(*theirs_in, *options)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(ours.shape, generator=g)
    for a, b_ in zip(torch.autograd.grad(ours, ours_in, upstream), torch.autograd.grad(theirs, theirs_in, upstream)):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("length", [150, 64, 1, 0])
@pytest.mark.parametrize("loss_uses_final_state", [True, False])
def test_ssd_scan_with_state_matches_step_reference(length, loss_uses_final_state):
    """The scan from a given state that returns its final one (a generation prefill): output and final state equal
    the step reference's from the same state, and so does every gradient, the initial state's included (a loss
    on the output alone: the final state's gradient is None, as when it only fills a cache)."""
    from sparsify.ops.ssd_scan import ssd_scan_fn

    g = torch.Generator().manual_seed(4)
    b, h, p, n = 2, 4, 3, 5
    tensors = [torch.randn(b, length, h, p, generator=g), torch.randn(b, length, h, generator=g),
               -torch.rand(h, generator=g), torch.randn(b, length, 2, n, generator=g),
               torch.randn(b, length, 2, n, generator=g), torch.randn(h, generator=g),
               torch.randn(b, length, h, p, generator=g), torch.randn(h, generator=g),
               torch.randn(b, h, p, n, generator=g)]
    ours_in = [t.clone().requires_grad_() for t in tensors]
    theirs_in = [t.clone().requires_grad_() for t in tensors]
    x, dt, A, B, C, D, z, dt_bias, state = ours_in
    y, final = ssd_scan_fn(x, dt, A, B, C, D, z, dt_bias, True, (0.05, 2.0), initial_states=state,
                           return_final_states=True)
    y_ref, final_ref = ssd_scan_ref(*theirs_in[:8], True, 0.05, 2.0, theirs_in[8], True)
    assert final.dtype == torch.float32 and final.shape == (b, h, p, n)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, final_ref, rtol=1e-5, atol=1e-5)
    if length == 0:
        return
    upstream = (torch.randn(y.shape, generator=g), torch.randn(final.shape, generator=g))
    if loss_uses_final_state:
        ours, theirs = torch.autograd.grad((y, final), ours_in, upstream), \
            torch.autograd.grad((y_ref, final_ref), theirs_in, upstream)
    else:
        ours, theirs = torch.autograd.grad(y, ours_in, upstream[0]), torch.autograd.grad(y_ref, theirs_in, upstream[0])
    for a, b_ in zip(ours, theirs):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-5)


def lm(layer, rms_norm=True, fused_add_norm=True):
    torch.manual_seed(0)
    ssm_cfg = {"layer": layer, "d_state": 8} | ({"headdim": 16} if layer == "Mamba2" else {})
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=101, ssm_cfg=ssm_cfg, rms_norm=rms_norm,
                         fused_add_norm=fused_add_norm, residual_in_fp32=True, pad_vocab_size_multiple=1)
    return MambaLMHeadModel(config).eval()


MOM = {"Mamba1": ["in_proj.weight", "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "out_proj.weight"],
       "Mamba2": ["in_proj.weight", "out_proj.weight"]}
CONFIGS = [("Mamba1", True, True), ("Mamba1", True, False), ("Mamba1", False, False), ("Mamba1", False, True),
           ("Mamba2", True, True), ("Mamba2", False, False)]


@pytest.mark.parametrize("layer,rms_norm,fused_add_norm", CONFIGS)
def test_mamba_lm_head_model_converts_to_mom(layer, rms_norm, fused_add_norm):
    dense = lm(layer, rms_norm, fused_add_norm)
    routed = sparsify.convert(dense, modalities=3)  # example token ids from config.vocab_size
    assert set(routed.plan.routed) == {f"backbone.layers.{i}.mixer.{p}" for i in range(2) for p in MOM[layer]}
    assert routed.verify_report.ok
    for batch, seq in [(2, 9), (3, 17), (1, 5)]:
        g = torch.Generator().manual_seed(seq)
        tokens, ids = torch.randint(0, 101, (batch, seq), generator=g), torch.randint(0, 3, (batch, seq), generator=g)
        with torch.no_grad():
            want, got = dense(tokens).logits, routed(tokens, modality_ids=ids).logits
        assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_routing_is_real_and_gradients_stay_per_modality(layer):
    dense = lm(layer)
    routed = sparsify.convert(dense, 3, example_inputs=(torch.randint(0, 101, (2, 9)),))
    tokens = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(0))
    ids = torch.zeros(2, 12, dtype=torch.long)
    ids[:, 7] = 2
    perturbed = copy.deepcopy(routed)
    with torch.no_grad():
        for fqn in perturbed.plan.routed:
            p = perturbed.get_parameter(fqn)[2]
            p.add_(0.3 * torch.randn_like(p))
        before, after = routed(tokens, modality_ids=ids).logits, perturbed(tokens, modality_ids=ids).logits
    changed = (before - after).abs().amax(-1)
    assert bool((changed[:, :7] == 0).all()) and bool((changed[:, 7:] > 1e-6).all())

    ids = torch.randint(0, 2, (2, 12), generator=torch.Generator().manual_seed(1))  # modality 2 absent
    upstream = torch.randn(2, 12, 101, generator=torch.Generator().manual_seed(2))
    (routed(tokens, modality_ids=ids).logits * upstream).sum().backward()
    (dense(tokens).logits * upstream).sum().backward()
    for fqn in routed.plan.routed:
        grad = routed.get_parameter(fqn).grad
        assert torch.count_nonzero(grad[2]) == 0 and grad[0].abs().max() > 0, fqn
        dense_grad = dense.get_parameter(fqn).grad
        assert float((grad.sum(0) - dense_grad).abs().max()) <= 1e-4 * float(dense_grad.abs().max()), fqn


def test_bare_mamba_block_and_the_ablation():
    torch.manual_seed(0)
    block = Mamba(d_model=16, d_state=8).eval()
    hidden = torch.randn(2, 9, 16)
    routed = sparsify.convert(block, 2, example_inputs=(hidden,))
    assert set(routed.plan.routed) == {"in_proj.weight", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
                                       "out_proj.weight"}
    other = torch.randn(3, 14, 16)
    torch.testing.assert_close(routed(other, modality_ids=torch.randint(0, 2, (3, 14))), block(other),
                               rtol=1e-5, atol=1e-5)
    ablated = sparsify.convert(block, 2, example_inputs=(hidden,), exclude=r"^dt_proj\.")
    assert set(ablated.plan.routed) == {"in_proj.weight", "x_proj.weight", "out_proj.weight"}
    everything = sparsify.convert(block, 2, example_inputs=(hidden,), policy="all")
    assert {"conv1d.weight", "conv1d.bias"} <= set(everything.plan.routed)


def test_hybrid_attention_and_mamba_layers_each_get_their_preset():
    torch.manual_seed(0)
    config = MambaConfig(d_model=32, n_layer=3, vocab_size=101, ssm_cfg={"layer": "Mamba1", "d_state": 8},
                         attn_layer_idx=[1], attn_cfg={"num_heads": 4}, rms_norm=True, fused_add_norm=True,
                         residual_in_fp32=True, pad_vocab_size_multiple=1)
    dense = MambaLMHeadModel(config).eval()
    routed = sparsify.convert(dense, 3, example_inputs=(torch.randint(0, 101, (2, 9)),))
    mamba_layers = {f"backbone.layers.{i}.mixer.{p}" for i in (0, 2) for p in MOM["Mamba1"]}
    attention_layer = {"backbone.layers.1.norm.weight"} | {f"backbone.layers.1.mixer.{p}.{w}"
                                                         for p in ("in_proj", "out_proj") for w in ("weight", "bias")}
    assert set(routed.plan.routed) == mamba_layers | attention_layer  # MoT for attention (norm too), MoM for Mamba
    assert routed.verify_report.ok


def test_cuda_tensors_run_mamba_ssm_kernels_except_while_export_traces(monkeypatch):
    # No GPU here: pretend every tensor is on CUDA and stand in for mamba_ssm's kernel. At run time the kernel
    # must be used; under export (a model captured on a GPU) the PyTorch path, as export cannot trace a kernel.
    from sparsify.frontends import mamba_ssm as frontend

    calls = []

    def kernel(x, *args, **kwargs):
        calls.append("kernel")
        return torch.zeros_like(x)

    rms_norm_fn = frontend._wrapped("rms_norm_fn", kernel)
    monkeypatch.setattr(frontend, "_on_cuda", lambda args, kwargs: True)
    x, weight = torch.randn(2, 5, 8), torch.rand(8) + 0.5
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    # A Triton kernel runs on CUDA with or without mamba_ssm's CUDA extension
    for present in (False, True):
        monkeypatch.setattr(frontend, "extension_present", lambda: present)
        assert torch.equal(rms_norm_fn(x, weight, None, eps=1e-6), torch.zeros_like(x))
    assert calls == ["kernel", "kernel"]
    # The fused Mamba1 function needs the extension itself: without it, its PyTorch form runs
    inner = frontend._wrapped("mamba_inner_fn", kernel)
    monkeypatch.setattr(frontend, "extension_present", lambda: False)
    monkeypatch.setattr(frontend, "CPU_IMPLEMENTATIONS", {"mamba_inner_fn": lambda *a, **k: "pytorch"})
    assert frontend._wrapped("mamba_inner_fn", kernel)(x) == "pytorch" and calls == ["kernel", "kernel"]
    monkeypatch.setattr(frontend, "extension_present", lambda: True)
    assert torch.equal(inner(x), torch.zeros_like(x)) and calls == ["kernel"] * 3
    calls.clear()
    calls.append("kernel")

    class Norm(torch.nn.Module):
        def forward(self, x):
            return rms_norm_fn(x, weight, None, eps=1e-6)

    exported = torch.export.export(Norm(), (x,), strict=False)
    assert calls == ["kernel"]  # export did not call the kernel
    assert any(n.target == torch.ops.aten.rsqrt.default for n in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x), expected)


def test_pytorch_causal_conv1d_fn_matches_its_definition():
    # causal_conv1d_fn (CUDA-only package) is replaced while export traces on a GPU; check the replacement.
    from sparsify.frontends import mamba_ssm as frontend

    g = torch.Generator().manual_seed(3)
    x, weight, bias = torch.randn(2, 5, 9, generator=g), torch.randn(5, 4, generator=g), torch.randn(5, generator=g)
    padded = torch.nn.functional.pad(x, (3, 0))
    expected = sum(weight[None, :, k, None] * padded[:, :, k:k + 9] for k in range(4)) + bias[None, :, None]
    conv = frontend._wrapped("causal_conv1d_fn", None)
    torch.testing.assert_close(conv(x, weight, bias), expected)
    torch.testing.assert_close(conv(x=x, weight=weight, bias=bias, activation="silu"),
                               torch.nn.functional.silu(expected))
    with pytest.raises(NotImplementedError, match="seq_idx"):
        conv(x, weight, bias, seq_idx=torch.zeros(2, 9, dtype=torch.int32))


def test_dense_mamba_ssm_model_on_cpu_runs_the_scan_op_with_mamba_ssm_reference_numbers():
    """Without the extension, a dense mamba_ssm model's scans on CPU are sparsify's scan op (chunked, analytic
    backward: a dense model trains as fast as a routed one). Its loss and gradients equal those of mamba_ssm's
    own selective_scan_ref under plain autograd (fp32, rel 1e-5 / 1e-4)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpRecorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=2, vocab_size=50, ssm_cfg={"d_state": 4}))
    tokens = torch.randint(0, 50, (2, 9))
    with OpRecorder() as recorder:
        loss = model(tokens).logits.square().mean()
    assert "sparsify.selective_scan" in recorder.ops
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    import mamba_ssm.modules.mamba_simple as mamba_simple
    from sparsify.frontends import mamba_ssm as frontend
    assert frontend.selective_scan_fn is mamba_simple.selective_scan_fn  # the process-wide wrapper (no extension)
    model.zero_grad()
    with pytest.MonkeyPatch.context() as mp:  # mamba_ssm's own reference scan, under autograd
        mp.setattr(frontend, "selective_scan_fn", selective_scan_ref)
        mp.setattr(mamba_simple, "selective_scan_fn", selective_scan_ref)
        with OpRecorder() as recorder:
            loss_ref = model(tokens).logits.square().mean()
        assert "sparsify.selective_scan" not in recorder.ops
        loss_ref.backward()
    assert abs(float(loss.detach() - loss_ref.detach())) <= 1e-5 * abs(float(loss_ref.detach()))
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6)


FAKE_EXTENSION_CHECK = r"""
import sys, importlib
import sparsify, selective_scan_cuda
assert not getattr(selective_scan_cuda, "__sparsify_stand_in__", False), "the fake extension must be the one found"
from sparsify.frontends import mamba_ssm as frontend
for name in frontend.PATCHES:
    if name.startswith("mamba_ssm"):
        importlib.import_module(name)
def entry_points():
    return {(m, n): getattr(sys.modules[m], n) for m, names in frontend.PATCHES.items() if m in sys.modules
            for n in names if hasattr(sys.modules[m], n)}
before = entry_points()
patched = [k for k, f in before.items() if getattr(f, "__module__", "") == frontend.__name__]
assert not patched, f"patched with the real extension present: {patched}"
import torch
from mamba_ssm.models.config_mamba import MambaConfig
from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
torch.manual_seed(0)
model = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=2, vocab_size=50, ssm_cfg={"d_state": 4}))
routed = sparsify.convert(model, 3, example_inputs=(torch.randint(0, 50, (2, 7)),))  # capture: graph forms
assert routed.verify_report.ok and routed.verify_report.max_rel_err <= 1e-5, routed.verify_report
assert entry_points() == before, "graph forms left in place after capture"
print("ok")
"""


def test_with_the_cuda_extension_present_nothing_of_mamba_ssm_is_replaced(tmp_path):
    # A test double of mamba_ssm's CUDA extension (this machine has none): an importable selective_scan_cuda.
    (tmp_path / "selective_scan_cuda.py").write_text(
        "def fwd(*args, **kwargs):\n    raise AssertionError('the CUDA extension must not run on CPU')\n"
        "bwd = fwd\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", FAKE_EXTENSION_CHECK], capture_output=True, text=True,
                            timeout=300, env=env, cwd=__import__("pathlib").Path(__file__).parents[1])
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
