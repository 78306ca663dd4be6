"""Bad input gets a clear error saying what was wrong and how to fix it; failures leave nothing behind."""
import copy
import json

import pytest
import torch

import sparsify
from tests.conftest import tiny_gpt2, tiny_llama
from tests.toy_models import DataDependent, SeqFirst, ToyLM


@pytest.fixture(scope="module")
def toy_routed():
    torch.manual_seed(0)
    model = ToyLM().eval()
    return model, sparsify.convert(model, 3, example_inputs=(torch.randint(0, 50, (2, 7)),))


@pytest.mark.parametrize("ids,message", [
    (torch.full((2, 7), 3), r"must lie in \[0, 3\).*\[3, 3\]"),
    (torch.full((2, 7), -1), r"must lie in \[0, 3\)"),
    (torch.zeros(2, 6, dtype=torch.long), r"shape \(2, 6\) but the tokens have shape \(2, 7\)"),
    (torch.zeros(14, dtype=torch.long), r"shape \(14,\) but the tokens have shape \(2, 7\)"),
    (torch.zeros(2, 7), r"integer modality indices.*float32"),
    ([[0] * 7] * 2, r"must be a torch.LongTensor"),
])
def test_bad_modality_ids(toy_routed, ids, message):
    _, routed = toy_routed
    with pytest.raises(ValueError, match=message):
        routed(torch.randint(0, 50, (2, 7)), modality_ids=ids)


def test_missing_modality_ids(toy_routed):
    _, routed = toy_routed
    with pytest.raises(sparsify.SparsifyError, match="modality_ids is required"):
        routed(torch.randint(0, 50, (2, 7)))


def test_int32_ids_are_accepted(toy_routed):
    model, routed = toy_routed
    tokens = torch.randint(0, 50, (2, 7))
    out = routed(tokens, modality_ids=torch.zeros(2, 7, dtype=torch.int32))
    torch.testing.assert_close(out, model(tokens), rtol=1e-5, atol=1e-6)


def test_id_range_check_can_be_turned_off(toy_routed, monkeypatch):
    # the range check costs a host sync per forward; a GPU training loop may skip it (shape checks stay)
    import sparsify.ops.modality_ids as modality_ids

    model, routed = toy_routed
    tokens, ids = torch.randint(0, 50, (2, 7)), torch.randint(0, 3, (2, 7))
    synced = []
    monkeypatch.setattr(modality_ids, "check_id_range", lambda ids, m: synced.append(m))
    routed(tokens, modality_ids=ids)
    assert synced == [3]
    routed.check_id_range = False
    try:
        out = routed(tokens, modality_ids=ids)
        assert synced == [3]  # no check this time
        with pytest.raises(ValueError, match="shape"):
            routed(tokens, modality_ids=ids[:, :5])
    finally:
        routed.check_id_range = True
    torch.testing.assert_close(out, model(tokens), rtol=1e-5, atol=1e-6)


def test_untraceable_model():
    with pytest.raises(sparsify.CaptureError, match="torch.export could not capture DataDependent"):
        sparsify.convert(DataDependent(), 2, example_inputs=(torch.randn(2, 5, 6),))


def test_plain_module_without_a_vocabulary_needs_example_inputs():
    with pytest.raises(sparsify.SparsifyError, match="shows no vocabulary.*Pass example_inputs"):
        sparsify.convert(SeqFirst(), 2)


def test_a_module_with_an_embedding_converts_from_token_ids_alone():
    model = ToyLM().eval()
    routed = sparsify.convert(model, 2)  # example token ids in [0, 50) from its nn.Embedding
    tokens = torch.randint(0, 50, (3, 4))
    torch.testing.assert_close(routed(tokens, modality_ids=torch.ones(3, 4, dtype=torch.long)), model(tokens))


class FeaturesWithPositionTable(torch.nn.Module):
    """Has an nn.Embedding, but its first input is float features, not token ids."""

    def __init__(self):
        super().__init__()
        self.positions = torch.nn.Embedding(64, 6)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(6, 6)])

    def forward(self, x):
        return self.layers[0](x.float().unsqueeze(-1).expand(-1, -1, 6) + self.positions.weight[: x.shape[1]])


def test_a_wrong_token_ids_guess_is_withdrawn_with_a_clear_error():
    with pytest.raises(sparsify.SparsifyError, match="(?s)does not look the first input up in an embedding.*"
                                                     "pass example_inputs"):
        sparsify.convert(FeaturesWithPositionTable(), 2)


@pytest.mark.parametrize("option,pattern,closest", [("include", r"\.upp\.", "layers.0.up.weight"),
                                                     ("exclude", "rmsnorm", "layers.0.rms.weight")])
def test_include_or_exclude_matching_nothing_names_the_closest_fqns(option, pattern, closest):
    with pytest.raises(sparsify.SparsifyError, match=f"{option}=.* matches no parameter.*{closest}"):
        sparsify.convert(ToyLM(), 2, **{option: pattern})


def test_every_modality_id_error_is_a_sparsify_error(toy_routed):
    _, routed = toy_routed
    for ids in (torch.full((2, 7), 3), torch.zeros(2, 6, dtype=torch.long), torch.zeros(2, 7), [[0] * 7] * 2):
        with pytest.raises(sparsify.SparsifyError):
            routed(torch.randint(0, 50, (2, 7)), modality_ids=ids)
    with pytest.raises(sparsify.SparsifyError, match="modality_ids has shape"):  # the functional API too
        sparsify.ops.routed_linear(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), torch.randn(2, 5, 4),
                                   None, backend="triton")


def test_converting_a_routed_model(toy_routed):
    _, routed = toy_routed
    with pytest.raises(sparsify.SparsifyError, match="already routed"):
        sparsify.convert(routed, 2)


def test_nothing_to_route_lists_why():
    with pytest.raises(sparsify.SparsifyError, match="(?s)selected no parameters.*embed.weight: an embedding"):
        sparsify.convert(ToyLM(), 2, example_inputs=(torch.randint(0, 50, (2, 7)),), policy="none")


def test_load_errors(toy_routed, tmp_path):
    model, routed = toy_routed
    with pytest.raises(sparsify.SparsifyError, match="no sparsify.json"):
        sparsify.load(tmp_path)
    path = sparsify.save(routed, tmp_path / "toy")
    with pytest.raises(sparsify.SparsifyError, match="pass the dense module or a factory"):
        sparsify.load(path)  # not a Hugging Face model: sparsify cannot rebuild it alone
    loaded = sparsify.load(path, model=ToyLM)  # a factory works
    tokens, ids = torch.randint(0, 50, (2, 7)), torch.randint(0, 3, (2, 7))
    assert torch.equal(loaded(tokens, modality_ids=ids), routed(tokens, modality_ids=ids))
    with pytest.raises(sparsify.SparsifyError, match=r"does not match the model: 'layers.0.\S+' is \["):
        sparsify.load(path, model=lambda: ToyLM(d=16))

    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(sparsify.SparsifyError, match="truncated"):
        sparsify.load(path, model=ToyLM)
    (path / "sparsify.json").write_text("{ not json")
    with pytest.raises(sparsify.SparsifyError, match="corrupted"):
        sparsify.load(path, model=ToyLM)


def test_hf_checkpoint_from_another_architecture(tmp_path):
    routed = sparsify.convert(tiny_llama(), 2)
    path = sparsify.save(routed, tmp_path / "llama")
    metadata = json.loads((path / "sparsify.json").read_text())
    metadata["model"]["config"]["hidden_size"] = 64
    (path / "sparsify.json").write_text(json.dumps(metadata))
    with pytest.raises(sparsify.SparsifyError, match="does not match the model"):
        sparsify.load(path)


def test_failed_save_leaves_nothing(toy_routed, tmp_path, monkeypatch):
    import sparsify.api

    _, routed = toy_routed

    def half_written(directory, tensors, max_shard_bytes):
        (directory / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(sparsify.api, "write_checkpoint", half_written)
    with pytest.raises(sparsify.SparsifyError, match="disk full"):
        sparsify.save(routed, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_gpt2_verify_against_the_wrong_model():
    routed = sparsify.convert(tiny_gpt2(), 2)
    with pytest.raises(sparsify.SparsifyError, match="is it the model that was converted"):
        sparsify.verify(tiny_gpt2(n_embd=64), routed)


class NormOnLinear(torch.nn.Module):
    """The MoT paper's output norm: an RMSNorm right on a projection's output."""

    def __init__(self, d=8):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"proj": torch.nn.Linear(d, d),
                                                               "norm": torch.nn.RMSNorm(d)}) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer["norm"](layer["proj"](x))
        return x


def test_a_failing_rewrite_is_an_internal_error_naming_pass_node_and_source(monkeypatch):
    from sparsify.passes import route

    def broken(self, value, stacked):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(route.Rewriter, "stacked", broken)  # the first rewrite in graph order: the linear's
    with pytest.raises(sparsify.InternalError) as info:
        sparsify.convert(NormOnLinear(), 3, example_inputs=(torch.randn(2, 5, 8),))
    message = str(info.value)
    assert "pass 'route'" in message and "RuntimeError: injected failure" in message
    assert "in module 'layers.0.proj'" in message and "test_errors.py" in message  # the model's source line
    excerpt = message.split("graph around it:\n")[1].splitlines()
    assert sum(line.startswith("  >>") for line in excerpt) == 1 and "%linear" in excerpt[3]
    assert "graph():" not in message and len(message.splitlines()) < 20


def test_a_rewrite_reading_a_replaced_node_is_reported_with_a_cut_graph(monkeypatch):
    """Without looking norm operands up through the replacements (the bug a norm on a linear's output hit),
    the graph is malformed: reported as an InternalError quoting a few nodes, not the whole graph."""
    from sparsify.passes import route

    monkeypatch.setattr(route.Rewriter, "current", lambda self, value: value)
    with pytest.raises(sparsify.InternalError) as info:
        sparsify.convert(NormOnLinear(), 3, example_inputs=(torch.randn(2, 5, 8),), policy="mot")
    message = str(info.value)
    assert "pass 'route'" in message and "used before it has been defined" in message
    assert "routed_rms_norm" in message.split("graph around it:\n")[1]
    assert "graph():" not in message and len(message.splitlines()) < 20


def test_norm_on_linear_output_converts():
    dense = NormOnLinear().eval()
    routed = sparsify.convert(dense, 3, example_inputs=(torch.randn(2, 5, 8),), policy="mot")
    assert len(routed.plan.params) == 6 and routed.verify_report.max_rel_err <= 1e-5


def test_cli_reports_an_internal_failure_in_one_line_without_a_traceback(monkeypatch, capsys, tmp_path):
    from sparsify import cli

    def broken(args):
        raise KeyError("past_key_values")

    monkeypatch.setattr(cli, "run", broken)
    assert cli.main(["inspect", str(tmp_path)]) == cli.EXIT_INTERNAL
    err = capsys.readouterr().err
    assert err.startswith("sparsify: internal error: sparsify inspect failed: KeyError: 'past_key_values'")
    assert "Traceback" not in err


def test_load_of_a_missing_directory_says_it_does_not_exist(tmp_path):
    with pytest.raises(sparsify.SparsifyError, match="does not exist"):
        sparsify.load(tmp_path / "nonexistent")


def test_a_model_on_the_meta_device_is_refused_with_the_way_out():
    with torch.device("meta"):
        model = ToyLM()
    with pytest.raises(sparsify.SparsifyError, match="meta device.*sparsify convert"):
        sparsify.convert(model, 3)


def test_many_modalities_are_warned_about():
    with pytest.warns(UserWarning, match="modalities=20 makes 20 copies of every routed parameter"):
        sparsify.convert(ToyLM(), 20, example_inputs=(torch.randint(0, 50, (2, 7)),), verify=False)


def test_more_than_64_modalities_need_an_explicit_opt_in():
    with pytest.raises(sparsify.SparsifyError, match="modalities=300 would make 300 copies.*allow_many_modalities"):
        sparsify.convert(ToyLM(), 300, example_inputs=(torch.randint(0, 50, (2, 7)),))
    with pytest.warns(UserWarning, match="modalities=65 makes 65 copies"):
        routed = sparsify.convert(ToyLM(), 65, example_inputs=(torch.randint(0, 50, (2, 7)),), verify=False,
                                  allow_many_modalities=True)
    assert routed.plan.modalities == 65


def test_triton_backend_on_cpu_without_the_interpreter_says_what_to_do(toy_routed, monkeypatch):
    _, routed = toy_routed
    routed = copy.deepcopy(routed)
    routed.backend = "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(sparsify.SparsifyError, match="TRITON_INTERPRET=1"):
        routed(torch.randint(0, 50, (2, 7)), modality_ids=torch.zeros(2, 7, dtype=torch.long))


class PooledSummaryBlock(torch.nn.Module):
    """A block with one linear on every token and one on the mean of windows of 2 tokens (as a compressed
    attention's summary): the second has no token, so no modality, to route by."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.layers = torch.nn.ModuleList([torch.nn.ModuleDict({"per_token": torch.nn.Linear(16, 16),
                                                                "summary": torch.nn.Linear(16, 16)})])

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            windows = h.reshape(h.shape[0], h.shape[1] // 2, 2, 16).mean(2)
            h = layer["per_token"](h) + layer["summary"](windows).mean(1, keepdim=True)
        return h


def test_a_parameter_with_no_per_token_use_stays_shared_under_a_preset_and_include_is_refused():
    example = (torch.randint(0, 50, (2, 8)),)
    with pytest.warns(UserWarning, match=r"2 parameters policy='mot' would route stay shared: none of their uses"):
        routed = sparsify.convert(PooledSummaryBlock(), 2, example_inputs=example, policy="mot")
    assert set(routed.plan.routed) == {"layers.0.per_token.weight", "layers.0.per_token.bias"}
    reasons = {p.fqn: p.reason for p in routed.plan.shared}
    assert reasons["layers.0.summary.weight"].startswith("no use of it can be routed per token")
    with pytest.raises(sparsify.RoutingError, match=r"layers\.0\.summary\.weight: node"):
        sparsify.convert(PooledSummaryBlock(), 2, example_inputs=example, include=r"summary")
