import torch

import sparsify
from sparsify.passes.lower import ROUTED_OPS
from tests.toy_models import ToyLM


def routed_nodes(routed, tokens):
    entry, _ = routed.graph_for(routed.bind_inputs((tokens,), {}))
    return [n for n in entry.routed.graph_module.graph.nodes if n.op == "call_function" and n.target in ROUTED_OPS]


def test_lower_picks_the_backend_per_device_and_request():
    torch.manual_seed(0)
    model = ToyLM().eval()
    tokens = torch.randint(0, 50, (2, 7))
    routed = sparsify.convert(model, 3, example_inputs=(tokens,), policy="all")
    nodes = routed_nodes(routed, tokens)
    assert len(nodes) == 11  # 7 routed linears, 2 layer norms, 2 RMS norms
    assert {n.kwargs["backend"] for n in nodes} == {"torch"}  # "auto" on CPU
    ids = torch.randint(0, 3, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = routed(tokens, modality_ids=ids)
    routed.backend = "triton"  # forces the kernels: on CPU they run under TRITON_INTERPRET=1
    assert {n.kwargs["backend"] for n in routed_nodes(routed, tokens)} == {"triton"}
    with torch.no_grad():
        torch.testing.assert_close(routed(tokens, modality_ids=ids), reference, rtol=1e-5, atol=1e-5)
    loss = routed(tokens, modality_ids=ids).pow(2).sum()
    loss.backward()
    assert routed.get_parameter("layers.0.up.weight").grad.abs().sum() > 0


def test_routed_graph_compiles_without_graph_breaks():
    torch.manual_seed(0)
    model = ToyLM().eval()
    tokens = torch.randint(0, 50, (2, 7))
    routed = sparsify.convert(model, 3, example_inputs=(tokens,))
    inputs = routed.bind_inputs((tokens,), {})
    entry, flat = routed.graph_for(inputs)
    ids = torch.randint(0, 3, (2, 7))
    args = routed.graph_args(entry.routed, flat) + [ids]
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(entry.routed.graph_module, backend=count, fullgraph=True)
    torch.testing.assert_close(compiled(*args)[0], entry.routed.graph_module(*args)[0])
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert sum(t.startswith("sparsify.routed_linear") for t in targets) == 6
