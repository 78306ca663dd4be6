"""Verify: run a dense and a routed graph on the same inputs and compare, node by node on a mismatch.

Outputs are compared first (cheap). Only when they differ are both graphs
re-run under an FX Interpreter that records every floating-point node, to name
the first routed-graph node (in execution order) whose value leaves tolerance.
A routed node is matched to the dense node it replaced via meta["sparsify_dense_node"]; a node of a
hoisted region (rows in modality order, passes/hoist.py) is put back in token order first.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from sparsify.errors import describe_node

# Relative tolerance (max |routed - dense| / max |dense|) by output dtype.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclass
class VerifyReport:
    ok: bool
    max_abs_err: float
    max_rel_err: float
    tolerance: float
    dtype: str
    first_divergent_node: str | None = None
    checked: str = ""

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "MISMATCH"
        text = (f"verify {verdict}: {self.checked}; dtype {self.dtype}, max abs err {self.max_abs_err:.3e}, "
                f"max rel err {self.max_rel_err:.3e} (tolerance {self.tolerance:.1e})")
        if self.first_divergent_node:
            text += f"; first divergent {self.first_divergent_node}"
        return text


def _errors(routed: torch.Tensor, dense: torch.Tensor) -> tuple[float, float]:
    diff = (routed.double() - dense.double()).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    scale = float(dense.double().abs().max()) if dense.numel() else 0.0
    return max_abs, max_abs / max(scale, torch.finfo(torch.float32).tiny)


class _Recorder(torch.fx.Interpreter):
    def __init__(self, graph_module):
        super().__init__(graph_module)
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, node):
        out = super().run_node(node)
        if isinstance(out, torch.Tensor):  # integer ones too: a hoisted region's row order
            self.values[node.name] = out.detach().clone()
        return out


def first_divergent_node(dense_gm, dense_args, routed_gm, routed_args, tolerance: float) -> str | None:
    dense, routed = _Recorder(dense_gm), _Recorder(routed_gm)
    with torch.no_grad():
        dense.run(*dense_args)
        routed.run(*routed_args)
    for node in routed_gm.graph.nodes:
        name = node.meta.get("sparsify_dense_node", node.name)
        a, b = routed.values.get(node.name), dense.values.get(name)
        inverse = routed.values.get(node.meta.get("sparsify_rows_sorted"))
        if a is not None and b is not None and inverse is not None and a.numel() == b.numel():
            a = a.index_select(0, inverse).reshape(b.shape)  # a hoisted region's rows, back in token order
        if a is None or b is None or a.shape != b.shape or not b.is_floating_point():
            continue
        if _errors(a, b)[1] > tolerance:
            return describe_node(node)
    return None


def compare_graphs(dense_gm, dense_args, routed_gm, routed_args, num_outputs_skipped: int = 0,
                   checked: str = "") -> VerifyReport:
    """Compare the float outputs of two graphs (skipping leading buffer-mutation outputs)."""
    with torch.no_grad():
        dense_out = list(dense_gm(*dense_args))[num_outputs_skipped:]
        routed_out = list(routed_gm(*routed_args))[num_outputs_skipped:]
    max_abs = max_rel = 0.0
    tolerance, dtype = TOLERANCE[torch.float32], torch.float32
    for r, d in zip(routed_out, dense_out):
        if isinstance(d, torch.Tensor) and d.is_floating_point():
            dtype = d.dtype
            tolerance = max(tolerance, TOLERANCE.get(d.dtype, 1e-5))
            a, rel = _errors(r, d)
            max_abs, max_rel = max(max_abs, a), max(max_rel, rel)
    ok = max_rel <= tolerance
    report = VerifyReport(ok, max_abs, max_rel, tolerance, str(dtype).replace("torch.", ""), checked=checked)
    if not ok:
        report.first_divergent_node = first_divergent_node(dense_gm, dense_args, routed_gm, routed_args, tolerance)
    return report
