import sympy
import torch

from sparsify.capture import bind_call, capture
from tests.toy_models import LoopOverTime, ToyLM


def test_capture_lifts_parameters_and_keeps_token_dims_symbolic():
    torch.manual_seed(0)
    model = ToyLM().eval()
    captured = capture(model, {"tokens": torch.randint(0, 50, (2, 7))})
    kinds = [kind for kind, _ in captured.placeholders]
    assert kinds == ["parameter"] * len(list(model.named_parameters())) + ["input"]
    assert {t for k, t in captured.placeholders if k == "parameter"} == {n for n, _ in model.named_parameters()}
    batch, seq = captured.token_dims
    assert isinstance(batch, sympy.Symbol) and isinstance(seq, sympy.Symbol) and batch != seq
    captured.graph_module.graph.lint()
    # the lifted graph is a pure function of (parameters, inputs)
    params = [model.get_parameter(t) for k, t in captured.placeholders if k == "parameter"]
    tokens = torch.randint(0, 50, (3, 11))
    (out,) = captured.graph_module(*params, tokens)
    torch.testing.assert_close(out, model(tokens))


def test_accepts_checks_ranks_ranges_and_specialised_sizes():
    torch.manual_seed(0)
    dynamic = capture(ToyLM().eval(), {"tokens": torch.randint(0, 50, (2, 7))})
    assert dynamic.accepts([torch.zeros(5, 30, dtype=torch.long)])
    assert not dynamic.accepts([torch.zeros(5, dtype=torch.long)])          # wrong rank
    assert not dynamic.accepts([torch.zeros(1, 30, dtype=torch.long)])      # export assumed batch >= 2
    looped = capture(LoopOverTime().eval(), {"x": torch.randn(2, 5, 6)})
    assert looped.token_dims[1] == 5                                        # the loop specialised seq
    assert looped.accepts([torch.randn(4, 5, 6)]) and not looped.accepts([torch.randn(4, 6, 6)])


def test_bind_call_gives_one_form_for_positional_and_keyword_calls():
    model = ToyLM()
    tokens = torch.zeros(2, 3, dtype=torch.long)
    assert list(bind_call(model, (tokens,), {})) == list(bind_call(model, (), {"tokens": tokens})) == ["tokens"]
