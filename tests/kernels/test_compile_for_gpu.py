"""Every Triton kernel compiles for A100 (sm_80) and H100 (sm_90) with what its launcher passes.

The interpreter tests check the kernels' arithmetic but never compile them.
sparsify.kernels.compile_check compiles the real launches to cubins without a
GPU (a separate process: the tests run with TRITON_INTERPRET=1, under which
kernels are not compilable Triton functions).
"""
import json
import os
import subprocess
import sys

import pytest

KERNELS = {"_grouped_matmul_kernel", "_grouped_weight_grad_kernel", "_norm_forward_kernel",
           "_norm_backward_kernel", "_conv_forward_kernel", "_conv_backward_kernel"}


def _compile_check(*args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "sparsify.kernels.compile_check", "--json", *args],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.stdout.strip(), result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def every_dtype_and_target() -> list[dict]:
    return _compile_check("--first-config-only")


def _aligned(report: dict) -> bool:
    return report["scenario"].endswith("aligned")


def test_every_kernel_compiles_for_sm80_and_sm90_in_every_dtype(every_dtype_and_target):
    failures = [f"sm_{r['arch']} {r['kernel']} {r['scenario']}: {r['error']}"
                for r in every_dtype_and_target if not r["ok"]]
    assert not failures, "\n".join(failures)
    compiled = {(r["kernel"], r["arch"], r["scenario"].split()[1]) for r in every_dtype_and_target}
    expected = {(k, arch, dtype) for k in KERNELS for arch in (80, 90) for dtype in ("float32", "float16", "bfloat16")}
    assert compiled == expected


def test_no_register_spills_at_model_like_shapes(every_dtype_and_target):
    # Feature sizes divisible by 16 (every real model's) must not spill; odd sizes may (unvectorised loads),
    # and so may full-fp32 GEMMs, which run on FMA units without tensor cores (a few bytes, measured 16-32).
    spills = [f"sm_{r['arch']} {r['kernel']} {r['scenario']}: {r['spill_bytes']} bytes"
              for r in every_dtype_and_target
              if _aligned(r) and r["spill_bytes"] and not (r["has_dot"] and "float32" in r["scenario"])]
    assert not spills, "\n".join(spills)


def test_grouped_gemms_use_tensor_cores_with_pipelined_loads(every_dtype_and_target):
    gemms = [r for r in every_dtype_and_target if r["has_dot"]]
    assert {r["kernel"] for r in gemms} == {"_grouped_matmul_kernel", "_grouped_weight_grad_kernel"}
    for r in gemms:
        if _aligned(r) and "float32" not in r["scenario"]:
            where = f"sm_{r['arch']} {r['kernel']} {r['scenario']}"
            assert r["pipelined"], f"{where}: operand loads are not pipelined into shared memory"
            assert r["wgmma"] == (r["arch"] == 90), f"{where}: wgmma={r['wgmma']}"


def test_every_autotune_config_compiles_for_h100_bf16():
    reports = _compile_check("--arch", "90", "--dtype", "bfloat16")
    gemms = [r for r in reports if r["has_dot"] and _aligned(r)]
    assert len(gemms) == 4 * 6  # forward, dx, dW and split-K dW launches, six configs each
    for r in reports:
        assert r["ok"], f"{r['kernel']} {r['config']}: {r['error']}"
    for r in gemms:
        assert r["wgmma"] and r["pipelined"] and not r["spill_bytes"], r
