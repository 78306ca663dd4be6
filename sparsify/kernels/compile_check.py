"""Compile every Triton kernel for NVIDIA GPUs on a machine without one, and report what the compiler made.

    python -m sparsify.kernels.compile_check [--arch 80 90] [--json]

The Triton interpreter runs the kernels' arithmetic on CPU but never compiles
them; a kernel can pass every interpreter test and still fail to compile for a
GPU, spill registers or leave its main loop unpipelined. This check runs the
real launchers (the code that picks strides, grids and constexprs) on CPU
tensors with launching replaced by recording, specialises each recorded
launch's arguments exactly as Triton's JIT would on a GPU (integers equal to 1
become constants, 16-divisible integers and pointers get divisibility hints),
and compiles it for each target and each autotune config down to a cubin with
Triton's bundled ptxas. It needs triton but no GPU and no CUDA driver.

Reported per compile: registers and local-memory (spill) bytes from cuobjdump,
shared memory, and for kernels with a tl.dot whether it became Hopper
warp-group MMA (wgmma) and whether the operand loads are pipelined (async
copies into shared memory). tests/kernels/test_compile_for_gpu.py asserts on it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from unittest import mock

import torch

# Shared memory one block may use: A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Launch:
    """One kernel launch as the launcher issued it: the JIT function, its arguments, and configs to try."""
    scenario: str
    kernel: object                # triton JITFunction
    args: dict                    # argument name -> value (tensors, ints, floats, constexprs)
    configs: list                 # [(constexpr dict, num_warps, num_stages)]


@dataclass
class CompileReport:
    kernel: str
    scenario: str
    arch: int
    config: str
    ok: bool
    error: str = ""
    registers: int = 0
    spill_bytes: int = 0
    shared_bytes: int = 0
    has_dot: bool = False
    wgmma: bool = False
    pipelined: bool = False


@contextmanager
def _recording(launches: list, scenario: str):
    """Replace launching (plain and autotuned kernels) by appending a Launch."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def jit_run(self, *args, grid, warmup, **kwargs):
        named = dict(zip(self.arg_names, args), **kwargs)
        warps, stages = named.pop("num_warps", 4), named.pop("num_stages", 3)
        launches.append(Launch(scenario, self, named, [({}, warps, stages)]))

    def autotune_run(self, *args, **kwargs):
        kwargs.pop("grid", None)
        named = dict(zip(self.arg_names, args), **kwargs)
        configs = [(dict(c.kwargs), c.num_warps, c.num_stages) for c in self.configs]
        launches.append(Launch(scenario, self.fn, named, configs))

    with mock.patch.object(JITFunction, "run", jit_run), mock.patch.object(Autotuner, "run", autotune_run):
        yield


def record_launches(dtypes=tuple(DTYPES.values())) -> list[Launch]:
    """Run every launcher, forward and backward, on aligned and odd shapes in each dtype; record the launches."""
    from sparsify.kernels import INTERPRET, routed_conv1d, routed_layer_norm, routed_linear

    if INTERPRET:
        raise RuntimeError("compile_check needs real Triton functions: run it without TRITON_INTERPRET=1")
    launches: list[Launch] = []
    modalities = 3
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        # aligned: feature sizes divisible by 16 as in real models; odd: nothing divisible, masks everywhere
        for shape_kind, (tokens, d_in, d_out, channels, length) in {
            "aligned": ((4, 64), 256, 512, 64, 128), "odd": ((3, 37), 100, 70, 35, 37),
        }.items():
            ids = torch.randint(0, modalities, tokens)
            x = torch.randn(*tokens, d_in, dtype=dtype)
            weight = torch.randn(modalities, d_out, d_in, dtype=dtype)
            bias = torch.randn(modalities, d_out, dtype=dtype)
            with _recording(launches, f"routed_linear {name} {shape_kind}"):
                routed_linear.routed_linear_forward(x, ids, weight, bias)
                grad = torch.randn(*tokens, d_out, dtype=dtype)
                routed_linear.routed_linear_backward(grad, x, ids, weight, True)
                routed_linear.routed_linear_backward(grad, x, ids, weight, True, splits=4)  # split-K over rows
            norm_weight = torch.randn(modalities, d_in, dtype=dtype)
            for is_rms in (False, True):
                op = "routed_rms_norm" if is_rms else "routed_layer_norm"
                with _recording(launches, f"{op} {name} {shape_kind}"):
                    routed_layer_norm.norm_forward(x, ids, norm_weight, None if is_rms else norm_weight, 1e-5, is_rms)
                    routed_layer_norm.norm_backward(x, x, ids, norm_weight, modalities, 1e-5, not is_rms, is_rms)
            conv_x = torch.randn(tokens[0], channels, length, dtype=dtype)
            conv_ids = torch.randint(0, modalities, (tokens[0], length))
            conv_weight = torch.randn(modalities, channels, 4, dtype=dtype)
            conv_bias = torch.randn(modalities, channels, dtype=dtype)
            with _recording(launches, f"routed_conv1d {name} {shape_kind}"):
                routed_conv1d.routed_conv1d_forward(conv_x, conv_ids, conv_weight, conv_bias)
                routed_conv1d.routed_conv1d_backward(conv_x, conv_x, conv_ids, conv_weight, True)
    return launches


def _source(kernel, args: dict, constexprs: dict):
    """The ASTSource the JIT would build for these argument values on an NVIDIA GPU."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    signature, attrs, constants = {}, {}, {}
    for index, param in enumerate(kernel.params):
        name = param.name
        value = constexprs.get(name, args.get(name, param.default))
        if param.is_constexpr or name in constexprs:
            signature[name], constants[(index,)] = "constexpr", value
            continue
        specialize = not param.do_not_specialize
        kind, spec = native_specialize_impl(CUDABackend, value, False, specialize, not param.do_not_specialize_on_alignment)
        if kind == "constexpr":  # an integer equal to 1 (a unit stride) becomes a constant
            signature[name], constants[(index,)] = "constexpr", spec
            continue
        signature[name] = kind
        if spec == "D":
            attrs[(index,)] = [["tt.divisibility", 16]]
    return triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, local-memory bytes) of a cubin, read with the cuobjdump Triton ships."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    if match is None:
        raise RuntimeError(f"cannot read cuobjdump -res-usage output: {out!r}")
    return int(match.group(1)), int(match.group(2)) + int(match.group(3))


def compile_launch(launch: Launch, arch: int) -> list[CompileReport]:
    import triton
    from triton.backends.compiler import GPUTarget

    reports = []
    for constexprs, warps, stages in launch.configs:
        config = ", ".join([f"{k}={v}" for k, v in constexprs.items()] + [f"warps={warps}", f"stages={stages}"])
        report = CompileReport(kernel=launch.kernel.__name__, scenario=launch.scenario, arch=arch, config=config,
                               ok=False)
        try:
            compiled = triton.compile(_source(launch.kernel, launch.args, constexprs),
                                      target=GPUTarget("cuda", arch, 32),
                                      options=dict(num_warps=warps, num_stages=stages))
        except Exception as error:  # a compile failure is the finding; report it and go on
            report.error = f"{type(error).__name__}: {error}"[:2000]
            reports.append(report)
            continue
        ttgir = compiled.asm["ttgir"]
        report.registers, report.spill_bytes = _resources(compiled.asm["cubin"])
        report.shared_bytes = compiled.metadata.shared
        report.has_dot = "tt.dot" in compiled.asm["ttir"]
        report.wgmma = "warp_group_dot" in ttgir
        report.pipelined = "async_copy_global_to_local" in ttgir or "async_tma_copy" in ttgir
        report.ok = report.shared_bytes <= SHARED_LIMIT[arch]
        if not report.ok:
            report.error = f"needs {report.shared_bytes} bytes of shared memory, sm_{arch} allows {SHARED_LIMIT[arch]}"
        reports.append(report)
    return reports


def check(archs=(80, 90), dtypes=tuple(DTYPES), first_config_only=False) -> list[CompileReport]:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default
    seen, reports = set(), []
    for launch in record_launches(tuple(DTYPES[d] for d in dtypes)):
        # launches that specialise alike (same kernel source, argument types and hints) compile alike
        key = _source(launch.kernel, launch.args, {}).hash()
        if key in seen:
            continue
        seen.add(key)
        if first_config_only:
            launch.configs = launch.configs[:1]
        for arch in archs:
            reports.extend(compile_launch(launch, arch))
    return reports


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_LIMIT),
                        help="compute capabilities to compile for (default: 80 90)")
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES),
                        help="input dtypes to launch with (default: all three)")
    parser.add_argument("--first-config-only", action="store_true",
                        help="compile only the first autotune config of each autotuned kernel (faster)")
    parser.add_argument("--json", action="store_true", help="print one JSON list of reports")
    args = parser.parse_args(argv)
    reports = check(tuple(args.arch), tuple(args.dtype), args.first_config_only)
    if args.json:
        print(json.dumps([asdict(r) for r in reports]))
    else:
        for r in reports:
            mma = ("wgmma" if r.wgmma else "mma") + (" pipelined" if r.pipelined else " NOT pipelined")
            print(f"sm_{r.arch} {r.kernel:30s} {r.scenario:32s} {r.config:45s} "
                  + (f"regs={r.registers:3d} spill={r.spill_bytes}B shared={r.shared_bytes // 1024}KiB"
                     + (f" {mma}" if r.has_dot else "") if r.ok else f"FAILED {r.error}"))
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    raise SystemExit(main())
