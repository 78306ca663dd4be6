"""Every training switch of the dense model works on the routed one (issue 28): autocast, torch.compile from
cold, Hugging Face's gradient checkpointing and config flags, PEFT LoRA, Trainer, pickling. Each routed model
is compared with its own dense model under the same switch."""
import copy
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import sparsify
from benchmarks.bench_checkpointing import saved_bytes_and_grads
from tests.conftest import tiny_llama

M = 3


def tokens(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 101, shape, generator=g), torch.randint(0, M, shape, generator=g)


def dense_and_routed():
    dense = tiny_llama().train()
    return dense, sparsify.convert(copy.deepcopy(dense), modalities=M).train()


def summed_grad(routed_param, dense_param):
    """A routed parameter's gradient summed over its modality copies: the dense gradient (init='copy')."""
    return routed_param.grad.sum(0) if routed_param.dim() > dense_param.dim() else routed_param.grad


def worst_grad_error(dense, routed):
    return max(float((summed_grad(r, d) - d.grad).abs().max() / d.grad.abs().max())
               for (_, d), r in zip(dense.named_parameters(), routed.parameters()) if d.grad is not None)


# -- autocast ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, grad_tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
@pytest.mark.parametrize("fp32_steps_first", [0, 1])
def test_autocast_step_equals_dense(dtype, grad_tol, fp32_steps_first):
    """Observed (CPU): loss identical to the dense model's under the same autocast; gradients within 5.4e-3
    (bf16) and 7.6e-4 (fp16) of the dense ones, relative to the largest."""
    dense, routed = dense_and_routed()
    x, ids = tokens((2, 12))
    for _ in range(fp32_steps_first):   # fp32 training graphs cached first must not be reused under autocast
        dense(x, labels=x).loss.backward()
        routed(x, modality_ids=ids, labels=x).loss.backward()
        dense.zero_grad(), routed.zero_grad()   # (no update: the copies stay equal, so dense stays the reference)
    with torch.autocast("cpu", dtype=dtype):
        dense_out = dense(x, labels=x)
        routed_out = routed(x, modality_ids=ids, labels=x)
    assert routed_out.logits.dtype == dense_out.logits.dtype == dtype
    torch.testing.assert_close(routed_out.loss, dense_out.loss, rtol=1e-2, atol=0)
    dense_out.loss.backward()
    routed_out.loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in routed.parameters() if p.grad is not None)
    assert worst_grad_error(dense, routed) <= grad_tol


# -- torch.compile from cold --------------------------------------------------------------------------------
def test_compile_from_cold_train_and_eval_new_size_classes():
    _, routed = dense_and_routed()
    compiled = torch.compile(routed)
    for training in (True, False):
        routed.train(training)
        for shape in [(3, 20), (1, 9)]:   # neither is the size class convert captured
            x, ids = tokens(shape)
            out = compiled(x, modality_ids=ids).logits
            torch.testing.assert_close(out, routed(x, modality_ids=ids).logits, rtol=1e-5, atol=1e-5)
    x, ids = tokens((3, 20))
    explained = torch._dynamo.explain(routed)(x, modality_ids=ids)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


# -- gradient checkpointing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_enable_recomputes_blocks(use_reentrant):
    dense, routed = dense_and_routed()
    x, ids = tokens((4, 48))
    runs = {"dense": (dense, lambda m, t: m(t, use_cache=False).logits),
            "routed": (routed, lambda m, t: m(t, modality_ids=ids).logits)}
    ratios = {}
    for name, (model, run) in runs.items():
        plain_bytes, plain = saved_bytes_and_grads(model, x, run)
        plain = {k: v.clone() for k, v in plain.items()}
        model.zero_grad()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        checked_bytes, checked = saved_bytes_and_grads(model, x, run)
        for key, grad in checked.items():
            torch.testing.assert_close(grad, plain[key], rtol=1e-6, atol=1e-7)
        model.zero_grad()
        model.gradient_checkpointing_disable()
        again_bytes, _ = saved_bytes_and_grads(model, x, run)
        assert again_bytes == plain_bytes, name
        ratios[name] = checked_bytes / plain_bytes
    assert ratios["routed"] < 0.3 and ratios["routed"] <= 1.5 * ratios["dense"], ratios


class CheckpointsAChild(nn.Module):
    """A model that checkpoints one child module itself (not through Hugging Face)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.block = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
        self.head = nn.Linear(16, 50)

    def forward(self, tokens):
        h = self.embed(tokens)
        h = h + checkpoint(self.block, h, use_reentrant=False) if self.training else h + self.block(h)
        return self.head(h)


class CheckpointsARegion(CheckpointsAChild):
    def forward(self, tokens):
        h = self.embed(tokens)
        return self.head(checkpoint(lambda v: v + self.block(v), h, use_reentrant=False))


def test_a_models_own_checkpoint_of_a_module_is_honoured():
    torch.manual_seed(0)
    dense = CheckpointsAChild().train()
    routed = sparsify.convert(copy.deepcopy(dense), modalities=M, example_inputs=(tokens((2, 8))[0] % 50,))
    routed.train()
    x, ids = tokens((2, 32))
    x = x % 50
    checked_bytes, grads = saved_bytes_and_grads(routed, x, lambda m, t: m(t, modality_ids=ids))
    dense_bytes, dense_grads = saved_bytes_and_grads(dense, x, lambda m, t: m(t))
    for (name, d), r in zip(dense.named_parameters(), routed.parameters()):
        torch.testing.assert_close(summed_grad(r, d), d.grad, rtol=1e-5, atol=1e-6)
    routed.zero_grad()
    entry = next(e for es in routed._graphs.values() for e in es if e.routed.state.checkpointed)
    assert set(entry.routed.state.checkpointed) == {"block"}
    assert checked_bytes < 1.3 * dense_bytes


def test_a_checkpoint_around_a_region_that_is_not_a_module_is_refused():
    torch.manual_seed(0)
    dense = CheckpointsARegion().train()
    with pytest.raises(sparsify.SparsifyError, match="not one module's forward.*Checkpoint modules instead"):
        sparsify.convert(dense, modalities=M, example_inputs=(tokens((2, 8))[0] % 50,))


# -- state the forward reads --------------------------------------------------------------------------------
def test_a_config_flag_the_forward_reads_picks_its_own_graph():
    dense, routed = dense_and_routed()
    dense.eval(), routed.eval()
    x, ids = tokens((2, 10))
    assert routed(x, modality_ids=ids).hidden_states is None
    routed.config.output_hidden_states = True   # the dense config: routed.config is dense.config's copy
    dense.config.output_hidden_states = True
    states = routed(x, modality_ids=ids).hidden_states
    assert states is not None and len(states) == len(dense(x).hidden_states)
    for got, want in zip(states, dense(x).hidden_states):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    routed.config.output_hidden_states = False
    assert routed(x, modality_ids=ids).hidden_states is None
    graphs = sum(len(entries) for entries in routed._graphs.values())
    routed(x, modality_ids=ids)
    assert sum(len(entries) for entries in routed._graphs.values()) == graphs   # the same state: no new graph


def test_a_list_attribute_changed_in_place_is_a_new_state():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.proj = nn.Embedding(50, 8), nn.Linear(8, 8)
            self.scales = [1.0, 1.0]   # read by the forward, changed in place by the user

        def forward(self, tokens):
            return self.proj(self.embed(tokens)) * self.scales[0]

    torch.manual_seed(0)
    dense = Gated().eval()
    x, ids = tokens((2, 8))
    routed = sparsify.convert(copy.deepcopy(dense), modalities=M, example_inputs=(x % 50,))
    dense.scales[0] = routed.scales[0] = 3.0
    torch.testing.assert_close(routed(x % 50, modality_ids=ids), dense(x % 50), rtol=1e-6, atol=1e-6)


# -- PEFT ----------------------------------------------------------------------------------------------------
def test_peft_lora_on_routed_base_weights_trains_and_merges():
    from peft import LoraConfig, get_peft_model

    dense, routed = dense_and_routed()
    x, ids = tokens((4, 16))
    q_weight = "model.layers.0.self_attn.q_proj.weight"
    before_merge = routed.get_parameter(q_weight).detach().clone()
    adapted = get_peft_model(routed, LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8))
    lora_a = adapted.get_parameter("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight")
    assert lora_a.shape == (4, 32)   # one adapter shared by every modality
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    assert trainable and all(p.dim() == 2 for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(4):
        loss = adapted(input_ids=x, modality_ids=ids, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    adapted.eval()
    with torch.no_grad():
        adapted_logits = adapted(input_ids=x, modality_ids=ids).logits
    merged = adapted.merge_and_unload()
    assert isinstance(merged, sparsify.RoutedModel)
    with torch.no_grad():
        torch.testing.assert_close(merged(x, modality_ids=ids).logits, adapted_logits, rtol=1e-5, atol=1e-5)
    delta = merged.get_parameter(q_weight).detach() - before_merge   # the same merged delta in every copy
    assert delta.abs().max() > 0
    for k in range(1, M):
        torch.testing.assert_close(delta[k], delta[0], rtol=1e-5, atol=1e-7)
    # routing stays real: modality 1's copy of the last token-wise weight changes modality 1's tokens only
    with torch.no_grad():
        merged.get_parameter("model.layers.1.mlp.down_proj.weight")[1] += 0.5
        changed = (merged(x, modality_ids=ids).logits - adapted_logits).abs().amax(-1) > 1e-4
    assert torch.equal(changed, ids == 1)


def test_peft_adapters_per_modality_by_converting_the_adapted_dense_model():
    from peft import LoraConfig, get_peft_model

    dense = tiny_llama().train()
    adapted = get_peft_model(dense, LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8))
    routed = sparsify.convert(adapted.base_model.model, modalities=M, policy="none", include=r"\.lora_")
    trainable = {n: p for n, p in routed.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n and p.shape[0] == M for n, p in trainable.items())
    x, _ = tokens((2, 12))
    ids = torch.zeros_like(x)   # modality 0 only: only modality 0's adapters learn
    routed(x, modality_ids=ids, labels=x).loss.backward()
    lora_b = trainable["model.layers.0.self_attn.q_proj.lora_B.default.weight"]
    assert lora_b.grad[0].abs().max() > 0 and lora_b.grad[1:].abs().max() == 0


# -- Hugging Face Trainer ------------------------------------------------------------------------------------
class MixedModalityRows(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.ids = tokens((16, 12), seed=1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i], "modality_ids": self.ids[i]}


def test_trainer_trains_saves_and_resumes(tmp_path):
    from transformers import Trainer, TrainingArguments

    from sparsify.trainer import RoutedCheckpoints

    def trainer(routed, steps):
        args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, max_steps=steps, save_steps=2,
                                 report_to=[], use_cpu=True, learning_rate=1e-3, seed=0, logging_steps=1)
        return Trainer(model=routed, args=args, train_dataset=MixedModalityRows(), callbacks=[RoutedCheckpoints()])

    _, first = dense_and_routed()
    initial = copy.deepcopy(first.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(first, 3).train()
        saved = sparsify.load(tmp_path / "checkpoint-2")   # a Trainer checkpoint is a sparsify checkpoint
        assert any(not torch.equal(initial[k], v) for k, v in saved.state_dict().items())
        _, resumed = dense_and_routed()
        trainer(resumed, 3).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    for (name, a), b in zip(first.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# -- pickling -------------------------------------------------------------------------------------------------
def test_torch_save_of_the_whole_module_round_trips_in_a_new_process(tmp_path):
    _, routed = dense_and_routed()
    routed.eval()
    x, ids = tokens((2, 10))
    with torch.no_grad():
        expected = routed(x, modality_ids=ids).logits
    torch.save(routed, tmp_path / "routed.pt")
    torch.save({"x": x, "ids": ids, "expected": expected}, tmp_path / "io.pt")
    script = (f"import torch; r = torch.load({str(tmp_path / 'routed.pt')!r}, weights_only=False); "
              f"io = torch.load({str(tmp_path / 'io.pt')!r}); "
              "out = r(io['x'], modality_ids=io['ids']).logits; "
              "assert torch.equal(out, io['expected']), (out - io['expected']).abs().max()")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
