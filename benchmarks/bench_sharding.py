"""Per-rank memory of a routed 7B model under FSDP2 at 8 to 256 ranks, without the hardware.

Builds the model on the meta device from a config (Llama-2-7B's shapes; a Chameleon-7B-like config with
q/k norms, as Qwen3's blocks have them), routes the parameters the `mot` preset picks on a tiny model of the
same family (every block's linears and norms) by stacking them [M, *S], and applies FSDP2 per block then the
root under torch's fake process group, as rank 0 and as the last rank (the largest and smallest shards
torch.chunk gives). Prints per-rank bytes of parameters, gradients and AdamW state (fp32) and the largest
unit's all-gather buffer (bf16 parameters), dense vs routed, for:
  sparsify: sparsify.fully_shard's placement (stacked parameters sharded on a feature dim)
  torch:    torch's fully_shard as it is (dim 0 = the modality dim)
A 2-D mesh is either HSDP (replicate x shard) or FSDP x TP, torchtitan's layout: tensor parallelism over 8
ranks by the config's own tp_plan (transformers'), the routed weights split on their feature dims as
sparsify.parallelize_module splits them, the dense ones as torch's ColwiseParallel / RowwiseParallel, then
FSDP2 over the other dim.
Targets: routed max per-rank bytes <= M x dense per-rank bytes x 1.02; max / min over ranks <= 1.05.
Usage: python benchmarks/bench_sharding.py [--worlds 8 64 256] [--modalities 2 3 4]
"""
import argparse
import re

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.testing._internal.distributed.fake_pg import FakeStore
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

import sparsify
from sparsify.sharding import placement_fn
from sparsify.tensor_parallel import COLUMN_WISE, PLACEMENTS, ROW_WISE, matches

SEVEN_B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000)
MODELS = {
    "Llama-2-7B": (LlamaConfig, LlamaForCausalLM, {}),
    "Chameleon-7B-like (q/k norms)": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 128}),
}
LAYER_INDEX = re.compile(r"\.layers\.\d+\.")


def routed_patterns(config_class, model_class, extra) -> set[str]:
    """FQNs (layer index replaced by *) that sparsify's mot plan routes on a tiny model of the family."""
    tiny = model_class(config_class(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=4, vocab_size=101, **({"head_dim": 8} if extra else {})))
    plan = sparsify.convert(tiny, modalities=2, verify=False).plan
    return {LAYER_INDEX.sub(".layers.*.", fqn) for fqn in plan.routed}


def build(config_class, model_class, extra, patterns, modalities):
    """The model on the meta device, its routed parameters stacked [M, *S]; and the ids of those."""
    with torch.device("meta"):
        model = model_class(config_class(**SEVEN_B, **extra))
    stacked = {}
    for fqn, param in list(model.named_parameters()):
        if modalities and LAYER_INDEX.sub(".layers.*.", fqn) in patterns:
            owner, _, name = fqn.rpartition(".")
            new = nn.Parameter(torch.empty((modalities, *param.shape), device="meta"))
            setattr(model.get_submodule(owner), name, new)
            stacked[id(new)] = fqn
    return model, stacked


def split_for_tensor_parallel(model, stacked: dict, mesh) -> dict:
    """The linears the config's tp_plan names split over `mesh` (1-D): a stacked weight on its feature dim as
    sparsify.parallelize_module places it, a dense one as torch's ColwiseParallel / RowwiseParallel. Returns
    the stacked parameters' new ids."""
    dense = {(COLUMN_WISE, "weight"): Shard(0), (COLUMN_WISE, "bias"): Shard(0),
             (ROW_WISE, "weight"): Shard(1), (ROW_WISE, "bias"): Replicate()}
    plan = model.config.base_model_tp_plan
    out = {}
    for name, module in model.model.named_modules():
        kind = next((style for key, style in plan.items() if matches(name, key)), None)
        if kind not in (COLUMN_WISE, ROW_WISE):
            continue
        for param_name, param in list(module.named_parameters(recurse=False)):
            placement = (PLACEMENTS if id(param) in stacked else dense)[(kind, param_name)]
            split = nn.Parameter(distribute_tensor(param, mesh, [placement]))
            if id(param) in stacked:
                out[id(split)] = stacked[id(param)]
            module.register_parameter(param_name, split)
    return {**{k: v for k, v in stacked.items() if k not in out}, **out}


def shard(model, stacked, modalities, mesh, placement):
    tensor_parallel = "tp" in (mesh.mesh_dim_names or ())
    fsdp_mesh = mesh["shard"] if tensor_parallel else mesh
    if tensor_parallel:
        stacked = split_for_tensor_parallel(model, stacked, mesh["tp"])
    group = fsdp_mesh.size(fsdp_mesh.ndim - 1)
    kwargs = {"mesh": fsdp_mesh}
    if placement == "sparsify" and stacked:
        kwargs["shard_placement_fn"] = placement_fn(stacked, group, modalities)
    units = list(model.model.layers) + [model]
    for unit in units:
        fully_shard(unit, **kwargs)
    local = sum(p.to_local().numel() for p in model.parameters()) * 4
    if tensor_parallel:  # FSDP2 gathers each rank's tensor-parallel part over the shard dim
        gather = max(sum(p.to_local().numel() for p in unit.parameters(recurse=unit is not model))
                     for unit in units) * group * 2
    else:
        gather = max(sum(p.numel() for p in unit.parameters(recurse=unit is not model)) for unit in units) * 2
    return local, gather


def per_rank(model_spec, patterns, modalities, world, shape, placement, tensor_parallel=False):
    """(max, min) over ranks of the per-rank bytes (params + grads + AdamW: 4x the fp32 shard) and the
    all-gather buffer."""
    out = []
    for rank in (0, world - 1):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        try:
            names = ("shard", "tp") if tensor_parallel else ("replicate", "shard")[-len(shape):]
            mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
            model, stacked = build(*model_spec, patterns, modalities)
            local, gather = shard(model, stacked, modalities, mesh, placement)
            out.append((4 * local, gather))
        finally:
            dist.destroy_process_group()
    return max(b for b, _ in out), min(b for b, _ in out), out[0][1]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worlds", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--modalities", type=int, nargs="+", default=[2, 3, 4])
    args = parser.parse_args()
    # (shape, tensor parallel over the last dim)
    meshes = ([((w,), False) for w in args.worlds] + [((8, w // 8), False) for w in args.worlds if w >= 64]
              + [((w // 8, 8), True) for w in args.worlds if w >= 64])
    gib = 2 ** 30
    header = ("| model | M | mesh | placement | dense GiB/rank | routed max GiB/rank | routed min GiB/rank | "
              "max / (M x dense) | max / min | all-gather GiB (dense, routed) |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for name, spec in MODELS.items():
        patterns = routed_patterns(*spec)
        for shape, tensor_parallel in meshes:
            world = 1
            for size in shape:
                world *= size
            dense_max, _, dense_gather = per_rank(spec, patterns, 0, world, shape, "torch", tensor_parallel)
            label = " x ".join(map(str, shape)) + (" (FSDP x TP)" if tensor_parallel else "")
            for modalities in args.modalities:
                for placement in ("sparsify", "torch"):
                    high, low, gather = per_rank(spec, patterns, modalities, world, shape, placement,
                                                 tensor_parallel)
                    spread = high / low if low else float("inf")
                    print(f"| {name} | {modalities} | {label} | {placement} | "
                          f"{dense_max / gib:.2f} | {high / gib:.2f} | {low / gib:.2f} | "
                          f"{high / (modalities * dense_max):.3f} | {spread:.3f} | "
                          f"{dense_gather / gib:.2f}, {gather / gib:.2f} |", flush=True)


if __name__ == "__main__":
    main()
