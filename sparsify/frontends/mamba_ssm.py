"""mamba_ssm on machines without its CUDA extension, and as a graph sparsify can capture.

mamba_ssm imports `selective_scan_cuda` (a CUDA extension) at import time and runs
its scans, convs and fused norms as CUDA/Triton kernels, which neither torch.export
nor a CPU can run. Two scopes:

- While sparsify captures (`graph_forms()`, entered by capture.py): each kernel
  entry point takes its *graph form*, plain PyTorch around the
  `sparsify::selective_scan` / `sparsify::ssd_scan` ops. Projections, convs and norm
  weights are then visible to routing, and each scan is one opaque op, so one
  capture serves every sequence length. On exit the originals are back.
- Only where the real extension is missing, for the whole process (mamba_ssm
  cannot even be imported otherwise): `import sparsify` installs an import hook
  that supplies a stand-in `selective_scan_cuda` (it raises if mamba_ssm's own
  CUDA path is ever reached) and wraps the entry points so that calls on CPU
  tensors run their graph forms (the scans: sparsify's CPU scan ops, so a dense
  model trains at the routed model's scan speed). Calls on CUDA tensors keep mamba_ssm's Triton
  kernels; only the functions that need the missing extension (the selective scan,
  the fused Mamba1 inner function) take the sparsify ops there.

With the real extension present, nothing of mamba_ssm is replaced outside capture.
The wrappers also serve libraries that call mamba_ssm (transformers' Mamba models
do when it is importable).
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from sparsify.ops import selective_scan as selective_scan_module
from sparsify.ops.selective_scan import selective_scan_fn  # mamba_ssm's signature over the sparsify ops
from sparsify.ops import ssd_scan as ssd_scan_module
from sparsify.frontends.base import Frontend

EXTENSION = "selective_scan_cuda"


@functools.cache
def extension_present() -> bool:
    return importlib.machinery.PathFinder.find_spec(EXTENSION) is not None


def _add_norm(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0,
              rowscale=None, prenorm=False, residual_in_fp32=False, is_rms_norm=False, return_dropout_mask=False):
    """(x + residual) then LayerNorm/RMSNorm, as mamba_ssm's fused kernel computes it, in plain PyTorch."""
    if x1 is not None or weight1 is not None or rowscale is not None or return_dropout_mask:
        raise NotImplementedError("sparsify's CPU (add+)norm supports the x, residual, dropout and prenorm "
                                  "arguments only (no x1/weight1/rowscale/dropout mask)")
    dtype = x.dtype
    if dropout_p > 0.0:
        x = F.dropout(x, p=dropout_p)
    if residual is not None:
        x = (x + residual).to(x.dtype)
    if is_rms_norm:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        out = h * weight.float()
        if bias is not None:
            out = out + bias.float()
        out = out.to(dtype)
    else:
        out = F.layer_norm(x.to(weight.dtype), x.shape[-1:], weight, bias, eps).to(dtype)
    if not prenorm:
        return out
    return out, (x.float() if residual_in_fp32 else x)


def _causal_conv1d(x, weight, bias, activation=None):
    """Depthwise causal conv over [b, d, l] with weight [d, k] (or [d, 1, k]): the form the route pass routes."""
    weight = weight if weight.dim() == 3 else weight.unsqueeze(1)
    out = F.conv1d(x, weight, bias, padding=weight.shape[-1] - 1, groups=x.shape[1])[..., : x.shape[-1]]
    return F.silu(out) if activation in ("silu", "swish") else out


def _causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    """The causal_conv1d package's causal_conv1d_fn (CUDA only) in PyTorch, for export on a GPU."""
    if seq_idx is not None or initial_states is not None or return_final_states or final_states_out is not None:
        raise NotImplementedError("sparsify's PyTorch causal_conv1d_fn takes x, weight, bias and activation only "
                                  "(no seq_idx or conv states)")
    return _causal_conv1d(x, weight, bias, activation)


def _gated_norm(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True, is_rms_norm=True):
    """mamba_ssm's gated (RMS|Layer)Norm: norm(x) * silu(z) or norm(x * silu(z)), per group of channels."""
    dtype = x.dtype
    h = x.float()
    gate = F.silu(z.float()) if z is not None else None
    if gate is not None and not norm_before_gate:
        h = h * gate
    size = group_size or h.shape[-1]
    grouped = h.reshape(*h.shape[:-1], h.shape[-1] // size, size)
    if not is_rms_norm:
        grouped = grouped - grouped.mean(-1, keepdim=True)
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    out = grouped.reshape(h.shape) * weight.float()
    if bias is not None:
        out = out + bias.float()
    if gate is not None and norm_before_gate:
        out = out * gate
    return out.to(dtype)


def _mamba_inner(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                 out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None,
                 delta_softplus=True, checkpoint_lvl=1, b_rms_weight=None, c_rms_weight=None, dt_rms_weight=None,
                 b_c_dt_rms_eps=1e-6):
    """The fused Mamba1 mixer (conv, x_proj, dt_proj, scan, out_proj) in PyTorch around the scan op."""
    if B is not None or C is not None or b_rms_weight is not None or c_rms_weight is not None \
            or dt_rms_weight is not None:
        raise NotImplementedError("sparsify's CPU mamba_inner_fn supports input-dependent B/C without RMS weights")
    length = xz.shape[-1]
    rank, state = delta_proj_weight.shape[1], A.shape[-1]
    x, z = xz.chunk(2, dim=1)
    x = _causal_conv1d(x, conv1d_weight, conv1d_bias, "silu")
    x_dbl = F.linear(x.transpose(1, 2).reshape(-1, x.shape[1]), x_proj_weight)  # [(b l), rank + 2 * state]
    delta = (delta_proj_weight @ x_dbl[:, :rank].t()).reshape(-1, xz.shape[0], length).transpose(0, 1)
    B = x_dbl[:, rank:rank + state].reshape(xz.shape[0], length, state).transpose(1, 2)
    C = x_dbl[:, rank + state:].reshape(xz.shape[0], length, state).transpose(1, 2)
    if B_proj_bias is not None:
        B = B + B_proj_bias[:, None]
    if C_proj_bias is not None:
        C = C + C_proj_bias[:, None]
    y = selective_scan_fn(x, delta, A, B, C, D.float() if D is not None else None, z=z,
                          delta_bias=delta_bias.float() if delta_bias is not None else None,
                          delta_softplus=delta_softplus)
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)


def _selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                            state_batch_indices=None, **unused):
    """One decoding step of the scan; updates `state` in place. Mamba1 ([b, d, n]) or Mamba2 ([b, h, p, n])."""
    if state_batch_indices is not None:
        raise NotImplementedError("sparsify's CPU selective_state_update does not take state_batch_indices")
    heads = state.dim() == 4
    if not heads:  # give Mamba1's tensors a head dim of one
        x, dt, A, B, C = x[:, None], dt[:, None], A[None], B[:, None], C[:, None]
        D = D[None] if D is not None else None
        z = z[:, None] if z is not None else None
        dt_bias = dt_bias[None] if dt_bias is not None else None
        state_view = state[:, None]
    else:
        state_view = state
    dt = dt.float() + (dt_bias.float() if dt_bias is not None else 0.0)
    dt = F.softplus(dt) if dt_softplus else dt
    B = B.float().repeat_interleave(x.shape[1] // B.shape[1], dim=1)[:, :, None, :]
    C = C.float().repeat_interleave(x.shape[1] // C.shape[1], dim=1)[:, :, None, :]
    new_state = state_view.float() * torch.exp(dt[..., None] * A.float()) + (dt * x.float())[..., None] * B
    state_view.copy_(new_state.to(state.dtype))
    out = (new_state * C).sum(-1)
    if D is not None:
        out = out + x.float() * D.float()
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(x.dtype)
    return out if heads else out[:, 0]


def _mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                               seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                               return_final_states=False, return_varlen_states=False):
    if seq_idx is not None or cu_seqlens is not None or return_varlen_states:
        raise NotImplementedError("sparsify's CPU SSD scan does not support packed sequences (seq_idx/cu_seqlens)")
    return ssd_scan_module.ssd_scan_fn(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, initial_states,
                                       return_final_states)


def _mamba_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                      initial_states=None, seq_idx=None, dt_limit=(0.0, float("inf")),
                                      return_final_states=False, activation="silu", rmsnorm_weight=None,
                                      rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None,
                                      ngroups=1, norm_before_gate=True):
    """The fused Mamba2 mixer after in_proj (conv, SSD scan, gated RMSNorm, out_proj) in PyTorch."""
    if return_final_states or initial_states is not None or seq_idx is not None:
        raise NotImplementedError("sparsify's CPU Mamba2 path does not return or take states")
    heads = A.shape[0]
    headdim = headdim if D.dim() == 1 else D.shape[1]
    dim = heads * headdim
    state = (zxbcdt.shape[-1] - 2 * dim - heads) // ngroups // 2
    z, xBC, dt = torch.split(zxbcdt, [dim, dim + 2 * ngroups * state, heads], dim=-1)
    xBC = _causal_conv1d(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, activation).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, ngroups * state, ngroups * state], dim=-1)
    batch, length = zxbcdt.shape[:2]
    z = z.reshape(batch, length, heads, headdim)
    y = _mamba_chunk_scan_combined(
        x.reshape(batch, length, heads, headdim), dt, A, B.reshape(batch, length, ngroups, state),
        C.reshape(batch, length, ngroups, state), chunk_size, D=D.float(),
        z=z if rmsnorm_weight is None else None, dt_bias=dt_bias, dt_softplus=True, dt_limit=dt_limit)
    y = y.reshape(batch, length, dim)
    if rmsnorm_weight is not None:
        y = _gated_norm(y, rmsnorm_weight, None, z=z.reshape(batch, length, dim), eps=rmsnorm_eps,
                        group_size=dim // ngroups, norm_before_gate=norm_before_gate)
    if outproj_weight is not None:
        y = F.linear(y, outproj_weight, outproj_bias)
    return y


def _gated_rmsnorm_fn(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    return _gated_norm(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm=True)


def _gated_layernorm_fn(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True,
                        is_rms_norm=False):
    return _gated_norm(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm)


def _rms_norm_fn(*args, **kwargs):
    return _add_norm(*args, is_rms_norm=True, **kwargs)


# name -> the PyTorch implementation CPU tensors take
CPU_IMPLEMENTATIONS = {
    "layer_norm_fn": _add_norm,
    "rms_norm_fn": _rms_norm_fn,
    "mamba_inner_fn": _mamba_inner,
    "selective_state_update": _selective_state_update,
    "mamba_chunk_scan_combined": _mamba_chunk_scan_combined,
    "mamba_split_conv1d_scan_combined": _mamba_split_conv1d_scan_combined,
    "rmsnorm_fn": _gated_rmsnorm_fn,
    "layernorm_fn": _gated_layernorm_fn,
    "causal_conv1d_fn": _causal_conv1d_fn,
}

# module -> names to wrap there (each module that defines or imports one of them)
PATCHES = {
    "mamba_ssm.ops.selective_scan_interface": ["selective_scan_fn", "mamba_inner_fn"],
    "mamba_ssm.ops.triton.layer_norm": ["layer_norm_fn", "rms_norm_fn"],
    "mamba_ssm.ops.triton.layernorm_gated": ["rmsnorm_fn", "layernorm_fn"],
    "mamba_ssm.ops.triton.selective_state_update": ["selective_state_update"],
    "mamba_ssm.ops.triton.ssd_combined": ["mamba_chunk_scan_combined", "mamba_split_conv1d_scan_combined"],
    "mamba_ssm.modules.mamba_simple": ["selective_scan_fn", "mamba_inner_fn", "selective_state_update",
                                       "layer_norm_fn", "rms_norm_fn", "causal_conv1d_fn"],
    "mamba_ssm.modules.mamba2": ["selective_state_update", "mamba_chunk_scan_combined",
                                 "mamba_split_conv1d_scan_combined", "causal_conv1d_fn"],
    # the causal_conv1d package (CUDA only, where installed): wrapped so that export on a GPU can trace it
    "causal_conv1d": ["causal_conv1d_fn"],
    "causal_conv1d.causal_conv1d_interface": ["causal_conv1d_fn"],
    "mamba_ssm.modules.block": ["layer_norm_fn"],
    "mamba_ssm.models.mixer_seq_simple": ["layer_norm_fn", "rms_norm_fn"],
}


def _on_cuda(args, kwargs) -> bool:
    first = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), None)
    return first is not None and first.is_cuda


# Entry points that reach the CUDA extension itself (the others are Triton kernels, which run on CUDA
# without it): without the extension they take the graph form on CUDA too.
NEEDS_EXTENSION = {"mamba_inner_fn", "selective_scan_fn"}


def _runs_mamba_ssm_kernel(name: str, args, kwargs) -> bool:
    """CUDA tensors, outside export, where the kernel can run (Triton, or the extension where installed)."""
    return _on_cuda(args, kwargs) and not torch.compiler.is_exporting() and (
        name not in NEEDS_EXTENSION or extension_present())


def _wrapped(name: str, original):
    graph_form = CPU_IMPLEMENTATIONS[name]

    def fn(*args, **kwargs):
        if original is not None and _runs_mamba_ssm_kernel(name, args, kwargs):
            return original(*args, **kwargs)
        return graph_form(*args, **kwargs)

    fn.__name__ = name
    fn.__module__ = __name__
    fn.__wrapped__ = original
    return fn


def _patch(module: types.ModuleType) -> list[tuple[types.ModuleType, str, object]]:
    """Wrap the module's entry points; returns (module, name, original) for each one replaced."""
    replaced = []
    for name in PATCHES.get(module.__name__, []):
        current = getattr(module, name, None)
        if current is None or getattr(current, "__module__", "") == __name__:
            continue
        if name == "mamba_chunk_scan_combined" and module.__name__.endswith("ssd_combined"):
            ssd_scan_module.cuda_chunk_scan = current  # the op's CUDA path: mamba_ssm's Triton kernels
        setattr(module, name, selective_scan_fn if name == "selective_scan_fn" else _wrapped(name, current))
        replaced.append((module, name, current))
    return replaced


@contextmanager
def graph_forms():
    """While sparsify captures: mamba_ssm's loaded entry points take their graph forms, restored on exit.
    Without the extension they are wrapped for good already (the wrappers see that export is tracing)."""
    if not extension_present():
        yield
        return
    replaced = [r for name in PATCHES if name in sys.modules for r in _patch(sys.modules[name])]
    try:
        yield
    finally:
        for module, name, original in reversed(replaced):
            setattr(module, name, original)


class _StandInExtension(importlib.abc.Loader):
    def create_module(self, spec):
        module = types.ModuleType(spec.name)

        def unavailable(*args, **kwargs):
            raise RuntimeError("mamba_ssm's CUDA extension (selective_scan_cuda) is not installed; sparsify routes "
                               "mamba_ssm's scans through sparsify::selective_scan instead. Reaching this means a "
                               "mamba_ssm code path sparsify does not patch: please report it.")

        module.fwd = module.bwd = unavailable
        module.__sparsify_stand_in__ = True
        return module

    def exec_module(self, module):
        pass


class _MambaSsmHook(importlib.abc.MetaPathFinder):
    """Patches mamba_ssm modules after they execute; provides the stand-in extension when it is missing."""

    def find_spec(self, name, path, target=None):
        if name == EXTENSION:
            if extension_present():
                return None
            return importlib.util.spec_from_loader(name, _StandInExtension())
        if name not in PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)
            _patch(module)

        loader.exec_module = exec_module
        return spec


def install() -> None:
    """Only where mamba_ssm's CUDA extension is missing: the stand-in and the wrappers (see the module)."""
    if extension_present():
        def cuda_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state=False):
            from mamba_ssm.ops.selective_scan_interface import SelectiveScanFn

            return SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)

        selective_scan_module.cuda_selective_scan = cuda_scan
        selective_scan_module.cuda_selective_scan_with_state = functools.partial(cuda_scan, return_last_state=True)
        return
    if any(isinstance(finder, _MambaSsmHook) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _MambaSsmHook())


# mamba_ssm serves no model's inputs (MambaLMHeadModel takes token ids: the token_ids frontend); around every
# capture its fused kernels take their graph forms.
FRONTEND = Frontend(name="mamba_ssm", matches=lambda model: False, graph_forms=graph_forms)
