"""After training: extract one modality into the dense class, export the routed model (fp32)."""
import pytest
import torch
import transformers as T

import sparsify


def trained_routed_llama():
    torch.manual_seed(0)
    dense = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))
    routed = sparsify.convert(dense.eval(), modalities=3).eval()
    with torch.no_grad():  # stands in for training: every modality's copies differ
        for fqn in routed.plan.routed:
            stacked = routed.get_parameter(fqn)
            stacked.add_(0.05 * torch.randn_like(stacked))
    return routed


@pytest.mark.parametrize("modality", [0, 2])
def test_extract_save_and_reload_equals_routed_on_that_modality(tmp_path, modality):
    routed = trained_routed_llama()
    dense = sparsify.extract(routed, modality=modality)
    assert type(dense) is T.LlamaForCausalLM and not any(k.startswith("_sparsify") for m in dense.modules()
                                                          for k in m.__dict__)
    dense.save_pretrained(tmp_path)
    reloaded = T.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        want = routed(tokens, modality_ids=torch.full((2, 9), modality)).logits
        got = reloaded(tokens).logits
        other = routed(tokens, modality_ids=torch.full((2, 9), (modality + 1) % 3)).logits
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-6
    assert float((got - other).abs().max()) > 1e-3  # another modality's weights give other logits
    assert routed.get_parameter("model.layers.0.mlp.up_proj.weight").shape[0] == 3  # the routed model is intact
    generated = reloaded.generate(tokens[:1], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 12)


def test_extract_rejects_a_modality_that_does_not_exist():
    routed = trained_routed_llama()
    for bad in (3, -1, 1.0, True):
        with pytest.raises(sparsify.SparsifyError, match=r"modality must be an int in \[0, 3\)"):
            sparsify.extract(routed, modality=bad)
    with pytest.raises(sparsify.SparsifyError, match="takes a RoutedModel"):
        sparsify.extract(torch.nn.Linear(2, 2), modality=0)


def test_export_round_trip_is_exact(tmp_path):
    routed = trained_routed_llama()
    path = sparsify.export(routed, tmp_path / "routed.pt2")
    assert path.exists() and not list(tmp_path.glob("*.partial"))
    loaded = torch.export.load(path).module()
    tokens, ids = torch.randint(0, 64, (2, 9)), torch.randint(0, 3, (2, 9))
    with torch.no_grad():
        want = routed(tokens, modality_ids=ids).logits
        got = loaded(tokens, modality_ids=ids)  # the routed model's call: use_cache=False is in the program
    assert type(got) is dict and torch.equal(got["logits"], want)  # plain containers: loads anywhere
    with pytest.raises(sparsify.SparsifyError, match=r"writes a \.pt2 file"):
        sparsify.export(routed, tmp_path / "routed.bin")
    with pytest.raises(sparsify.SparsifyError, match="does not exist"):
        sparsify.export(routed, tmp_path / "missing" / "routed.pt2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["routed.pt2"]


def test_exported_program_loads_and_runs_in_a_new_process(tmp_path):
    """A fresh interpreter that imports sparsify (not transformers) loads the .pt2 and runs it with the routed
    model's call; the logits equal the routed model's bitwise."""
    import subprocess
    import sys
    from pathlib import Path

    routed = trained_routed_llama()
    path = sparsify.export(routed, tmp_path / "routed.pt2")
    tokens, ids = torch.randint(0, 64, (2, 9)), torch.randint(0, 3, (2, 9))
    torch.save({"tokens": tokens, "ids": ids}, tmp_path / "inputs.pt")
    script = ("import sys, torch, sparsify\n"
              f"inputs = torch.load({str(tmp_path / 'inputs.pt')!r})\n"
              f"program = torch.export.load({str(path)!r}).module()\n"
              "out = program(inputs['tokens'], modality_ids=inputs['ids'])\n"
              f"torch.save(out['logits'], {str(tmp_path / 'logits.pt')!r})\n"
              "print('transformers' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "False"  # nothing of the model's library needed
    with torch.no_grad():
        want = routed(tokens, modality_ids=ids).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt"), want)
