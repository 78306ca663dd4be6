"""Upcycling a pretrained model (issue 31): frozen modalities, per-modality learning rates, add_modality, drift.

Frozen copies are checked bitwise after AdamW steps with weight decay (here and, on 2 gloo processes, under
FSDP2); the routed linear's skipped weight-gradient GEMMs are counted at the dispatcher.
"""
import os
import tempfile
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import sparsify
from sparsify.errors import SparsifyError
from tests.conftest import tiny_gpt2, tiny_llama
from tests.test_cli import cli

M = 3
DOWN = "model.layers.0.mlp.down_proj.weight"


def batch(seed=0, shape=(2, 16), modalities=M):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 100, shape, generator=g), torch.randint(0, modalities, shape, generator=g)


def lm_loss(model, tokens, ids):
    logits = model(tokens, modality_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def train(routed, optimizer, steps=3, modalities=M):
    routed.train()
    for step in range(steps):
        lm_loss(routed, *batch(step, modalities=modalities)).backward()
        optimizer.step()
        optimizer.zero_grad()


def stacked_state(routed):
    return {k: v.detach().clone() for k, v in routed.state_dict().items()}


# -- freezing ---------------------------------------------------------------------------------------------------
def test_frozen_copies_bitwise_unchanged_by_adamw_and_without_optimizer_state():
    routed = sparsify.convert(tiny_llama(), modalities=M, frozen=[0])
    assert routed.frozen_modalities == [0]
    before = stacked_state(routed)
    optimizer = torch.optim.AdamW(routed.parameters(), lr=1e-2, weight_decay=0.1)  # every parameter handed over
    train(routed, optimizer)
    after = stacked_state(routed)
    assert set(after) == set(before)  # the state dict keeps the stacked format
    for fqn in routed.plan.routed:
        assert after[fqn].shape == before[fqn].shape and after[fqn].shape[0] == M
        assert torch.equal(after[fqn][0], before[fqn][0]), fqn       # bitwise
        assert not torch.equal(after[fqn][1], before[fqn][1]), fqn   # the others trained
        assert not torch.equal(after[fqn][2], before[fqn][2]), fqn
    frozen = [p for p in routed.parameters() if not p.requires_grad]
    assert len(frozen) == len(routed.plan.params)  # one per routed tensor: modality 0's copy
    assert all(p not in optimizer.state for p in frozen)
    assert all(p in optimizer.state for p in routed.parameters() if p.requires_grad)


def test_split_model_computes_what_the_stacked_one_does_and_unfreeze_trains_again():
    dense = tiny_llama()
    stacked, split = sparsify.convert(dense, modalities=M), sparsify.convert(dense, modalities=M, frozen=[1])
    tokens, ids = batch()
    stacked.train(), split.train()
    loss_stacked, loss_split = lm_loss(stacked, tokens, ids), lm_loss(split, tokens, ids)
    assert torch.equal(loss_stacked, loss_split)
    loss_stacked.backward(), loss_split.backward()
    copies = split.model.layers[0].mlp.down_proj.parametrizations.weight
    grad = stacked.get_parameter(DOWN).grad
    assert copies.original1.grad is None
    assert torch.allclose(copies.original0.grad, grad[0], rtol=1e-6, atol=1e-7)
    assert torch.allclose(copies.original2.grad, grad[2], rtol=1e-6, atol=1e-7)
    split.unfreeze(1)
    assert split.frozen_modalities == [] and copies.original1.requires_grad
    copies.original1.requires_grad_(False)  # frozen_modalities is read from the copies, not kept beside them
    assert split.frozen_modalities == []  # modality 1's copy of one weight alone: the modality still trains
    assert split.requires_grad_(False).frozen_modalities == [0, 1, 2]
    split.requires_grad_(True)
    split.zero_grad()
    lm_loss(split, tokens, ids).backward()
    assert torch.allclose(copies.original1.grad, grad[1], rtol=1e-6, atol=1e-7)


class CountedOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def backward_gemms(routed, tokens, ids) -> int:
    loss = lm_loss(routed, tokens, ids)
    with CountedOps() as counted:
        loss.backward()
    return sum(counted.counts[name] for name in ("mm", "addmm", "addmm_", "bmm"))


def test_frozen_weight_gradients_are_not_computed():
    """Each routed linear runs one weight-gradient GEMM per modality present (rows grouped by modality once per
    block by hoist): freezing a modality removes exactly one GEMM per routed linear, and nothing else."""
    dense = tiny_llama()
    tokens, _ = batch()
    ids = torch.arange(M).repeat_interleave(6)[:16].expand(2, 16).contiguous()  # every modality present
    counts = {}
    for frozen in ([], [0], [0, 2]):
        routed = sparsify.convert(dense, modalities=M, frozen=frozen).train()
        routed.param_groups()  # split even with nothing frozen: the same representation compared
        backward_gemms(routed, tokens, ids)  # first call captures
        counts[len(frozen)] = backward_gemms(routed, tokens, ids)
    linears = sum(1 for p in routed.plan.params if p.role == "linear")
    assert linears == 14  # q, k, v, o, gate, up, down in each of 2 blocks
    assert counts[0] - counts[1] == linears
    assert counts[0] - counts[2] == 2 * linears


def test_param_groups_give_each_modality_its_learning_rate():
    routed = sparsify.convert(tiny_llama(), modalities=M, frozen=[0])
    groups = routed.param_groups(lr={1: 0.0, "shared": 0.0}, weight_decay=0.0)
    assert [g["modality"] for g in groups] == ["shared", 1, 2]
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in routed.parameters() if p.requires_grad)
    before = stacked_state(routed)
    train(routed, torch.optim.AdamW(groups, lr=1e-2))
    after = stacked_state(routed)
    for fqn in routed.plan.routed:
        assert torch.equal(after[fqn][0], before[fqn][0]) and torch.equal(after[fqn][1], before[fqn][1])
        assert not torch.equal(after[fqn][2], before[fqn][2])
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    with pytest.raises(SparsifyError, match=r"lr keys are modalities in \[0, 3\)"):
        routed.param_groups(lr={3: 1.0})


def test_frozen_modalities_survive_save_and_load(tmp_path):
    routed = sparsify.convert(tiny_llama(), modalities=M, frozen=[0, 2])
    train(routed, torch.optim.AdamW(routed.parameters(), lr=1e-2, weight_decay=0.1), steps=1)
    sparsify.save(routed, tmp_path / "routed")
    loaded = sparsify.load(tmp_path / "routed")
    assert loaded.frozen_modalities == [0, 2]
    for fqn, value in stacked_state(routed).items():
        assert torch.equal(loaded.state_dict()[fqn], value), fqn
    tokens, ids = batch(5)
    routed.eval()
    with torch.no_grad():
        assert torch.equal(loaded(tokens, modality_ids=ids).logits, routed(tokens, modality_ids=ids).logits)
    copies = loaded.model.layers[1].self_attn.q_proj.parametrizations.weight
    assert [copies.original0.requires_grad, copies.original1.requires_grad, copies.original2.requires_grad] == \
        [False, True, False]


def test_freeze_rejects_bad_modalities():
    with pytest.raises(SparsifyError, match=r"ints in \[0, 3\)"):
        sparsify.convert(tiny_llama(), modalities=M, frozen=[3])
    routed = sparsify.convert(tiny_gpt2(), modalities=2)
    with pytest.raises(SparsifyError, match=r"ints in \[0, 2\)"):
        routed.freeze(-1)
    with pytest.raises(SparsifyError, match="an int or a list"):
        routed.freeze("text")


def _fsdp_frozen(rank, world, directory, results):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    dist.init_process_group("gloo", init_method=f"file://{directory}/init", rank=rank, world_size=world)
    try:
        routed = sparsify.convert(tiny_llama(), modalities=M, frozen=[0]).train()
        before = stacked_state(routed)
        tokens, ids = batch(rank)
        routed.precapture(tokens, modality_ids=ids)
        for block in routed.model.layers:
            sparsify.fully_shard(block)
        sparsify.fully_shard(routed)
        # param_groups after sharding: the sharded copies FSDP2 put in the tree, not the ones split made
        groups = routed.param_groups(weight_decay=0.1)
        live = {id(p) for p in routed.parameters()}
        in_groups = [p for g in groups for p in g["params"]]
        assert all(id(p) in live and type(p.data).__name__ == "DTensor" for p in in_groups)
        assert len(in_groups) == sum(1 for p in routed.parameters() if p.requires_grad)
        try:
            routed.freeze(1)
            raise AssertionError("freeze after fully_shard was accepted")
        except SparsifyError as e:
            assert "before fully_shard" in str(e)
        optimizer = torch.optim.AdamW(groups, lr=1e-2)
        for _ in range(3):
            lm_loss(routed, tokens, ids).backward()
            optimizer.step()
            optimizer.zero_grad()
        copies = routed.model.layers[0].mlp.down_proj.parametrizations.weight
        local_rows = [copies.original0.to_local().shape[0], copies.original1.to_local().shape[0]]
        full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in routed.state_dict().items()}
        unchanged = [[torch.equal(full[fqn][m], before[fqn][m]) for m in range(M)] for fqn in routed.plan.routed]
        frozen_with_state = sum(1 for p in optimizer.state if not p.requires_grad)
        results[rank] = (local_rows, unchanged, frozen_with_state)
        if rank == 0:
            torch.save(full, f"{directory}/full.pt")
        dcp.save({"model": get_model_state_dict(routed)}, checkpoint_id=f"{directory}/ckpt")  # stacked keys
        dist.barrier()  # no rank tears its process group down while another still talks to it (gloo aborts)
    finally:
        dist.destroy_process_group()


def test_frozen_copies_unchanged_under_fsdp2():
    """2 gloo processes: each per-modality copy [64, 32]-sized down_proj sharded over both ranks on its dim 0; the
    frozen copies bitwise unchanged after three AdamW steps with weight decay, no optimizer state for them. The
    DCP checkpoint of the split, sharded model consolidates into a split template and loads back exactly."""
    directory = tempfile.mkdtemp()
    results = mp.Manager().dict()
    mp.spawn(_fsdp_frozen, args=(2, directory, results), nprocs=2)
    for rank in range(2):
        local_rows, unchanged, frozen_with_state = results[rank]
        assert local_rows == [16, 16]  # down_proj's copies are [32, 64]: half the rows on each rank
        assert all(row[0] for row in unchanged) and not any(row[1] or row[2] for row in unchanged)
        assert frozen_with_state == 0
    template = sparsify.convert(tiny_llama(), modalities=M, frozen=[0])  # split: loads through the state-dict hook
    out = sparsify.consolidate(f"{directory}/ckpt", template, f"{directory}/routed")
    loaded, full = sparsify.load(out), torch.load(f"{directory}/full.pt")
    assert loaded.frozen_modalities == [0]
    state = loaded.state_dict()
    assert set(state) == set(full) and all(torch.equal(state[k], full[k]) for k in full)


# -- add_modality -----------------------------------------------------------------------------------------------
def test_add_modality_equal_on_old_ids_and_new_copy_trains(tmp_path):
    routed = sparsify.convert(tiny_llama(), modalities=2, frozen=[0])
    train(routed, torch.optim.AdamW(routed.parameters(), lr=1e-2), steps=1, modalities=2)
    tokens, ids = batch(7, modalities=2)
    routed.eval()
    with torch.no_grad():
        want = routed(tokens, modality_ids=ids).logits
    assert sparsify.add_modality(routed, copy_from=1) is routed
    assert routed.plan.modalities == 3 and routed.frozen_modalities == [0]
    assert routed.get_parameter(DOWN).shape[0] == 3
    with torch.no_grad():
        assert torch.equal(routed(tokens, modality_ids=ids).logits, want)
        as_new = torch.where(ids == 1, 2, ids)  # modality 2 starts as a copy of 1
        assert torch.equal(routed(tokens, modality_ids=as_new).logits, want)
    before = stacked_state(routed)
    train(routed, torch.optim.AdamW(routed.parameters(), lr=1e-2, weight_decay=0.1), steps=2)
    after = stacked_state(routed)
    assert torch.equal(after[DOWN][0], before[DOWN][0]) and not torch.equal(after[DOWN][2], before[DOWN][2])
    sparsify.save(routed, tmp_path / "three")
    loaded = sparsify.load(tmp_path / "three")
    assert loaded.plan.modalities == 3 and loaded.frozen_modalities == [0]
    assert torch.equal(loaded.get_parameter(DOWN), routed.get_parameter(DOWN).detach())
    with pytest.raises(SparsifyError, match=r"must lie in \[0, 3\)"):
        loaded(tokens, modality_ids=torch.full_like(ids, 3))


def test_add_modality_independent_reinitialises_only_the_new_copy():
    routed = sparsify.convert(tiny_llama(), modalities=2)
    before = stacked_state(routed)
    sparsify.add_modality(routed, init="independent")
    after = stacked_state(routed)
    for fqn in routed.plan.routed:
        assert torch.equal(after[fqn][:2], before[fqn][:2])
    new, old = after[DOWN][2], after[DOWN][0]
    assert not torch.equal(new, old) and abs(float(new.std()) / float(old.std()) - 1) < 0.2  # the same initialiser
    assert torch.equal(after["model.layers.0.input_layernorm.weight"][2], torch.ones(32))  # norms init to ones
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # shared: untouched
        assert torch.equal(after[name], before[name])
    with pytest.raises(SparsifyError, match=r"ints in \[0, 3\)"):
        sparsify.add_modality(routed, copy_from=5)
    with pytest.raises(SparsifyError, match="copy_from is one modality"):
        sparsify.add_modality(routed, copy_from=[0, 1])


def test_add_modality_cli(tmp_path):
    routed = sparsify.convert(tiny_llama(), modalities=2)
    sparsify.save(routed, tmp_path / "two")
    result = cli("add-modality", tmp_path / "two", "-o", tmp_path / "three", "--copy-from", 1)
    assert result.returncode == 0, result.stderr
    assert "2 -> 3 modalities" in result.stdout
    loaded = sparsify.load(tmp_path / "three")
    assert loaded.plan.modalities == 3
    assert torch.equal(loaded.get_parameter(DOWN)[2], routed.get_parameter(DOWN)[1].detach())
    again = cli("add-modality", tmp_path / "two", "-o", tmp_path / "three")
    assert again.returncode == 2 and "already exists" in again.stderr
    assert not any(p.name.startswith(".three") for p in tmp_path.iterdir())  # nothing half-written


# -- drift ------------------------------------------------------------------------------------------------------
def test_drift_of_known_perturbations(tmp_path):
    dense = tiny_llama()
    routed = sparsify.convert(dense, modalities=M)
    q = "model.layers.1.self_attn.q_proj.weight"
    with torch.no_grad():
        routed.get_parameter(DOWN)[1].mul_(2.0)        # copy 1 = 2 W: distance(0, 1) = |W| / 1.5 |W| = 2/3
        routed.get_parameter(q)[2].neg_()               # copy 2 = -W: distance(0, 2) = 2, update -2W
        routed.get_parameter(q)[1].mul_(0.5)            # copy 1 = W / 2: update -W / 2, same direction as -2W
    result = sparsify.drift(routed, reference=dense)
    assert result.get(DOWN, (0, 1)).distance == pytest.approx(2 / 3, rel=1e-5)
    assert result.get(DOWN, (0, 2)).distance == 0.0
    assert result.get(DOWN, (1, 2)).distance == pytest.approx(2 / 3, rel=1e-5)
    assert result.get(q, (0, 2)).distance == pytest.approx(2.0, rel=1e-5)
    assert result.get(q, (1, 2)).cosine == pytest.approx(1.0, abs=1e-5)
    assert result.get(q, (0, 1)).cosine is None  # copy 0 did not move
    untouched = "model.layers.0.self_attn.k_proj.weight"
    assert result.get(untouched, (0, 1)).distance == 0.0
    blocks, roles, grid = result.matrix((0, 1))
    assert blocks == ["model.layers.0", "model.layers.1"] and "mlp.down_proj.weight" in roles
    assert grid[0][roles.index("mlp.down_proj.weight")] == pytest.approx(2 / 3, rel=1e-5)
    png = result.plot(tmp_path / "drift.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert q in result.table()


def test_inspect_drift_cli(tmp_path):
    dense = tiny_llama()
    dense.save_pretrained(tmp_path / "dense")
    routed = sparsify.convert(dense, modalities=2)
    with torch.no_grad():
        routed.get_parameter(DOWN)[1].mul_(2.0)
    sparsify.save(routed, tmp_path / "routed")
    result = cli("inspect", tmp_path / "routed", "--drift", tmp_path / "drift.png", "--reference", tmp_path / "dense")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "drift.png").stat().st_size > 5000
    assert DOWN in result.stdout and "0.6667" in result.stdout
    bad = cli("inspect", tmp_path / "routed", "--drift", tmp_path / "drift.txt")
    assert bad.returncode == 2 and ".png, .svg or .pdf" in bad.stderr


def test_upcycle_demo_on_a_tiny_config(tmp_path):
    """demos/upcycle.py end to end: (b)'s text forgetting exactly 0 (the demo checks it too), finite falling
    training losses for all three arms, the table, the PNGs."""
    import importlib.util
    import math
    import sys
    from pathlib import Path

    demos = Path(__file__).parents[1] / "demos"
    sys.path.insert(0, str(demos))
    try:
        spec = importlib.util.spec_from_file_location("upcycle", demos / "upcycle.py")
        demo = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(demo)
        result = demo.main(["--seeds", "2", "--pretrain-steps", "30", "--steps", "16", "--batch", "4", "--length",
                            "32", "--hidden", "32", "--layers", "1", "--warmup", "2", "--finetune-lr", "3e-3",
                            "--out", str(tmp_path)])
    finally:
        sys.path.remove(str(demos))
    for seed_result in result["results"]:
        frozen = seed_result["frozen"]
        assert frozen["forgetting"] == 0.0 and frozen["text_after"] == frozen["text_before"]
        assert seed_result["trained"]["forgetting"] != 0.0  # the same model with text trainable moves
        for arm in ("dense", "frozen", "trained"):
            losses = seed_result[arm]["train_losses"]
            assert len(losses) == 16 and all(math.isfinite(x) for x in losses), arm
            assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, f"{arm}: training loss did not fall: {losses}"
        assert seed_result["frozen"]["trainable"] < seed_result["trained"]["trainable"]
    assert "text forgetting" in result["table"] and "over 2 seeds" in result["table"]
    for png in (result["png"], result["drift_png"]):
        assert Path(png).read_bytes().startswith(b"\x89PNG") and Path(png).stat().st_size > 10_000


def test_frozen_model_under_torch_compile():
    """torch.compile of a model with a frozen modality: one graph, no break; the same loss and gradients as
    eager, and still no gradient for the frozen copies."""
    compiled_model = sparsify.convert(tiny_llama(), modalities=M, frozen=[0]).train()
    eager_model = sparsify.convert(tiny_llama(), modalities=M, frozen=[0]).train()
    tokens, ids = batch(3)
    compiled = torch.compile(compiled_model)
    for _ in range(2):  # the first call captures (one break, by design); the second runs compiled
        compiled_model.zero_grad()
        loss = lm_loss(compiled, tokens, ids)
        loss.backward()
    want = lm_loss(eager_model, tokens, ids)
    want.backward()
    assert torch.allclose(loss, want, rtol=1e-6)
    got_copies = compiled_model.model.layers[0].mlp.down_proj.parametrizations.weight
    want_copies = eager_model.model.layers[0].mlp.down_proj.parametrizations.weight
    assert got_copies.original0.grad is None
    assert torch.allclose(got_copies.original2.grad, want_copies.original2.grad, rtol=1e-5, atol=1e-7)
    explained = torch._dynamo.explain(compiled_model)(tokens, modality_ids=ids)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
