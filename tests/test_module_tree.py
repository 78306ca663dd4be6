"""The routed model runs as the dense model's module tree: hooks, FSDP2 per block, DDP, checkpointing.

Distributed tests run 2 CPU processes with gloo; each compares its sharded or replicated training step
with a single-process step of the same model on the whole batch (fp32, rel <= 1e-5).
"""
import copy
import functools
import gc
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import sparsify
from tests.conftest import tiny_llama

TOLERANCE = 1e-5


def tiny_mamba():
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    return MambaForCausalLM(MambaConfig(num_hidden_layers=2, hidden_size=16, state_size=4, vocab_size=101,
                                        intermediate_size=32, use_mambapy=False)).eval()


FAMILIES = {"llama": (tiny_llama, "model.layers"), "mamba": (tiny_mamba, "backbone.layers")}


def lm_loss(model, tokens, ids):
    logits = model(tokens, modality_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def batch(batch_size=4, seq=9):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 101, (batch_size, seq), generator=g), torch.randint(0, 3, (batch_size, seq), generator=g)


def relative(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _shard(routed, blocks):
    from torch.distributed.fsdp import fully_shard

    for block in routed.get_submodule(blocks):
        fully_shard(block)
    return fully_shard(routed)


def _checkpoint_round_trip(model, family, blocks, directory):
    """DCP save of the sharded model, load into another sharded one (exact), consolidation on rank 0."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=f"{directory}/dcp")
    factory, _ = FAMILIES[family]
    other = _shard(sparsify.convert(factory(), modalities=3).train(), blocks)
    state = {"model": get_model_state_dict(other)}
    dcp.load(state, checkpoint_id=f"{directory}/dcp")
    set_model_state_dict(other, state["model"])
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    mine, theirs = get_model_state_dict(model, options=full), get_model_state_dict(other, options=full)
    if dist.get_rank() == 0:
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
        template = sparsify.convert(factory(), modalities=3)
        sparsify.consolidate(f"{directory}/dcp", template, f"{directory}/consolidated")
        loaded = sparsify.load(f"{directory}/consolidated").state_dict()
        assert loaded.keys() == mine.keys() and all(torch.equal(loaded[k], mine[k]) for k in mine)
    dist.barrier()


def _train_step(family, wrapping, directory):
    """One training step of the routed model, FSDP2 per block or DDP, against one process on the whole batch."""
    from torch.nn.parallel import DistributedDataParallel

    rank, world = dist.get_rank(), dist.get_world_size()
    factory, blocks = FAMILIES[family]
    routed = sparsify.convert(factory(), modalities=3).train()
    tokens, ids = batch()
    routed(tokens, modality_ids=ids)  # the training graph, split per module
    assert all(e.module_forwards is not None for es in routed._graphs.values() for e in es)
    reference = copy.deepcopy(routed)
    reference_loss = lm_loss(reference, tokens, ids)
    reference_loss.backward()
    mine = slice(rank * 2, rank * 2 + 2)
    with torch.no_grad():  # capture the training graph before sharding (export cannot capture DTensors)
        routed(tokens[mine], modality_ids=ids[mine])
    if wrapping == "fsdp":
        model = _shard(routed, blocks)
    else:
        model = DistributedDataParallel(routed)
    loss = lm_loss(model, tokens[mine], ids[mine])
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    assert relative(mean_loss / world, reference_loss.detach()) <= TOLERANCE
    reference_params = dict(reference.named_parameters())
    for name, param in routed.named_parameters():
        grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        assert relative(grad, reference_params[name].grad) <= TOLERANCE, name
    if wrapping == "fsdp":
        _checkpoint_round_trip(model, family, blocks, directory)
    # DDP's reducer holds the process group: release it (and wait for the peer) before the next case or
    # destroying the group, or its threads can abort the process at exit ("terminate called without an
    # active exception").
    dist.barrier()
    del model
    gc.collect()


def _mixed_precision_step(directory):
    """FSDP2 with MixedPrecisionPolicy(bf16 parameters, fp32 gradient reduction) vs one process with bf16
    parameters: bf16 tolerances (loss rel <= 1e-2, gradients rel <= 2e-2; bf16 eps is 7.8e-3)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    routed = sparsify.convert(tiny_llama(), modalities=3).train()
    tokens, ids = batch()
    reference = copy.deepcopy(routed)
    for param in reference.parameters():
        param.data = param.data.to(torch.bfloat16)
    reference_loss = lm_loss(reference, tokens, ids)
    reference_loss.backward()
    mine = slice(rank * 2, rank * 2 + 2)
    routed.precapture(tokens[mine], modality_ids=ids[mine], param_dtype=torch.bfloat16)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in routed.model.layers:
        fully_shard(block, mp_policy=policy)
    model = fully_shard(routed, mp_policy=policy)
    loss = lm_loss(model, tokens[mine], ids[mine])
    loss.backward()
    mean_loss = loss.detach().float()
    dist.all_reduce(mean_loss)
    assert relative(mean_loss / world, reference_loss.detach().float()) <= 1e-2
    reference_params = dict(reference.named_parameters())
    for name, param in routed.named_parameters():
        assert param.grad.dtype == torch.float32 and param.dtype == torch.float32  # fp32 master copies
        assert relative(param.grad.full_tensor(), reference_params[name].grad.float()) <= 2e-2, name
    dist.barrier()
    del model
    gc.collect()


DISTRIBUTED_CASES = {
    **{f"{wrapping}-{family}": functools.partial(_train_step, family, wrapping)
       for wrapping in ("fsdp", "ddp") for family in sorted(FAMILIES)},
    "fsdp-bf16-llama": _mixed_precision_step,
}


def _run_distributed_cases(rank, world, directory):
    """Every case in one pair of processes: each start of a pair pays the import of torch and transformers
    twice, about as long as a case itself. A case that got through on both ranks is written down; the first
    failure ends the run (its peer may be waiting in a collective), and mp.spawn reports it."""
    dist.init_process_group("gloo", init_method=f"file://{directory}/init", rank=rank, world_size=world)
    try:
        for name, case in DISTRIBUTED_CASES.items():
            case_directory = f"{directory}/{name}"
            if rank == 0:
                os.makedirs(case_directory)
            dist.barrier()
            case(case_directory)
            dist.barrier()
            if rank == 0:
                open(f"{directory}/{name}.passed", "w").close()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_outcomes():
    """{case: None where it passed on both ranks, else why not}."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.spawn(_run_distributed_cases, args=(2, tmp), nprocs=2, join=True)
            failure = None
        except Exception as error:  # mp.spawn's ProcessRaisedException carries the worker's traceback
            failure = f"{type(error).__name__}: {error}"
        return {name: None if os.path.exists(f"{tmp}/{name}.passed") else
                f"{name} failed, or was not reached after an earlier case failed: {failure}"
                for name in DISTRIBUTED_CASES}


@pytest.mark.parametrize("case", [name for name in DISTRIBUTED_CASES if "bf16" not in name])
def test_two_process_step_equals_one_process_step(distributed_outcomes, case):
    assert distributed_outcomes[case] is None, distributed_outcomes[case]


def test_fsdp2_mixed_precision_bf16_parameters_fp32_reduction(distributed_outcomes):
    assert distributed_outcomes["fsdp-bf16-llama"] is None, distributed_outcomes["fsdp-bf16-llama"]


@pytest.fixture(scope="module")
def llama():
    dense = tiny_llama()
    return dense, sparsify.convert(dense, modalities=3)


def test_block_hooks_fire_once_with_the_block_output(llama):
    dense, routed = llama
    tokens, ids = batch()
    seen, dense_seen = [], []
    handle = routed.model.layers[1].register_forward_hook(lambda module, args, out: seen.append(out))
    dense_handle = dense.model.layers[1].register_forward_hook(lambda module, args, out: dense_seen.append(out))
    try:
        with torch.no_grad():
            routed(tokens, modality_ids=torch.zeros_like(ids))
            dense(tokens, use_cache=False)
    finally:
        handle.remove()
        dense_handle.remove()
    assert len(seen) == 1 and len(dense_seen) == 1
    dense_out = dense_seen[0][0] if isinstance(dense_seen[0], tuple) else dense_seen[0]
    assert relative(seen[0], dense_out) <= TOLERANCE
    assert [type(m).__name__ for m in routed.model.layers] == ["LlamaDecoderLayer"] * 2  # the dense classes


def test_activation_checkpointing_gives_the_same_gradients(llama):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (apply_activation_checkpointing,
                                                                             checkpoint_wrapper)

    _, routed = llama
    tokens, ids = batch()
    plain = copy.deepcopy(routed).train()
    checked = copy.deepcopy(routed).train()
    apply_activation_checkpointing(checked, checkpoint_wrapper_fn=checkpoint_wrapper,
                                   check_fn=lambda m: m in set(checked.model.layers))
    assert "checkpoint_wrapped" in type(checked.model.layers[0]).__name__.lower() or \
        hasattr(checked.model.layers[0], "_checkpoint_wrapped_module")
    for model in (plain, checked):
        lm_loss(model, tokens, ids).backward()
    checked_params = {n.replace("._checkpoint_wrapped_module", ""): p for n, p in checked.named_parameters()}
    for name, param in plain.named_parameters():
        assert relative(checked_params[name].grad, param.grad) <= TOLERANCE, name


def test_a_module_outside_a_routed_call_says_why(llama):
    _, routed = llama
    with pytest.raises(sparsify.SparsifyError, match="runs only inside the routed model's forward"):
        fresh = copy.deepcopy(routed)
        fresh.__dict__.pop("_running", None)
        fresh.model.layers[0](torch.randn(2, 9, 32))


def test_blocks_run_the_routed_ops_in_eager_form_without_custom_op_dispatch(llama):
    """Eagerly, training runs each routed op's reference and backward without torch.library's dispatch
    (ops/eager.py); under torch.compile (the test below) the blocks still hold the custom ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            names.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    _, routed = llama
    tokens, ids = batch()
    model = copy.deepcopy(routed).train()
    lm_loss(model, tokens, ids)  # captures the training graph (export traces the custom ops), outside the record
    names = []
    with RecordOps():
        lm_loss(model, tokens, ids).backward()
    assert "aten::mm" in names and not [n for n in names if n.startswith("sparsify::")]
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_torch_compile_of_the_model_and_of_a_block_without_graph_breaks(llama):
    _, routed = llama
    tokens, ids = batch()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(routed)(tokens, modality_ids=ids)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    compiled = torch.compile(routed)
    for shape in [(4, 9), (3, 5)]:
        t, i = torch.randint(0, 101, shape), torch.randint(0, 3, shape)
        with torch.no_grad():
            assert relative(compiled(t, modality_ids=i).logits, routed(t, modality_ids=i).logits) <= TOLERANCE
    block_inputs = []
    handle = routed.model.layers[0].register_forward_pre_hook(lambda m, args: block_inputs.append(args))
    try:
        with torch.no_grad():
            routed(tokens, modality_ids=ids)
    finally:
        handle.remove()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(routed.model.layers[0])(*block_inputs[0])
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "hf_checkpointing"])
def test_compiling_each_block_compiles_their_shared_code_once(checkpointing):
    """Regional compilation (`block.compile()` per block, as torchtitan compiles): blocks of the same code
    share one compiled graph, more blocks than dynamo's recompile limit (8) included, also under Hugging
    Face's gradient checkpointing, and a training step equals eager's (fp32, rel <= 1e-5)."""
    from torch._dynamo.utils import counters

    dense = tiny_llama(num_hidden_layers=9)
    if checkpointing:
        dense.gradient_checkpointing_enable()
    routed = sparsify.convert(dense, 3).train()
    tokens, ids = batch()
    eager = copy.deepcopy(routed)
    want = lm_loss(eager, tokens, ids)
    want.backward()
    torch._dynamo.reset()
    counters.clear()
    for block in routed.model.layers:
        block.compile()
    loss = lm_loss(routed, tokens, ids)
    loss.backward()
    assert counters["stats"]["unique_graphs"] == 1 and counters["frames"]["total"] == 1, dict(counters["stats"])
    assert relative(loss.detach(), want.detach()) <= TOLERANCE
    for (name, p), q in zip(routed.named_parameters(), eager.parameters()):
        assert relative(p.grad, q.grad) <= TOLERANCE, name


class WithAnUnusedModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.ModuleDict({"used": torch.nn.Linear(4, 4),
                                                                "unused": torch.nn.Linear(4, 4)})])

    def forward(self, x):
        return self.layers[0]["used"](x)


def test_a_module_the_forward_never_calls_keeps_its_dense_forward():
    dense = WithAnUnusedModule()
    routed = sparsify.convert(dense, 2, example_inputs=(torch.randn(2, 5, 4),))
    x, ids = torch.randn(2, 5, 4), torch.randint(0, 2, (2, 5))
    routed(x, modality_ids=ids)
    assert routed.layers[0]["used"].__dict__.get("_sparsify_fqn") == "layers.0.used"   # runs its subgraph
    unused = routed.layers[0]["unused"]
    assert "forward" not in unused.__dict__ and "layers.0.unused.weight" not in routed.plan.routed
    torch.testing.assert_close(unused(x), dense.layers[0]["unused"](x))                # plain and shared


class Scaled(torch.nn.Module):
    def forward(self, x, kind: str):  # two graphs: one per kind (as a rotary embedding per attention kind)
        return x * 2.0 if kind == "a" else x.sin()


class CallsAChildTwice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = Scaled()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])

    def forward(self, x):
        a, b = self.scale(x, "a"), self.scale(x, "b")
        return self.layers[1](self.layers[0](a) + b)


def test_a_module_called_twice_runs_inlined_in_its_parent_and_the_rest_keeps_its_modules():
    """unflatten gives a module called twice with different graphs one copy per call; sparsify inlines such a
    module into its parent (Gemma 3's rotary embedding) instead of running the whole model as one flat graph:
    the other modules keep their subgraphs and hooks, and the output equals dense."""
    import warnings

    torch.manual_seed(0)
    dense = CallsAChildTwice()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        routed = sparsify.convert(dense, 2, example_inputs=(torch.randn(2, 5, 4),))
        x, ids = torch.randn(2, 5, 4), torch.randint(0, 2, (2, 5))
        seen = []
        for name in ("layers.0", "layers.1", "scale"):
            routed.get_submodule(name).register_forward_hook(lambda module, args, out, name=name: seen.append(name))
        out = routed(x, modality_ids=ids)
    assert not [w for w in caught if "one flat graph" in str(w.message)]
    assert seen == ["layers.0", "layers.1"]  # the inlined module's own hook does not fire
    assert routed.layers[0].__dict__.get("_sparsify_fqn") == "layers.0"
    torch.testing.assert_close(out, dense(x), rtol=1e-6, atol=1e-6)
