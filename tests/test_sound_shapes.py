"""Sound shapes: models whose sizes collide, or whose code specialises sizes, convert once and match the
dense model at every call (fp32, max abs err / max |dense| <= 1e-5, 3 modalities, init="copy").

A captured graph is reused only where it is valid: a re-capture happens where export's guards (or the
0 / 1 / >= 2 class of a size in the graph) say so, and never otherwise.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers as T

import sparsify
from sparsify.capture import capture

TOLERANCE = 1e-5


def relative_error(got, want) -> float:
    return float((got - want).abs().max() / want.abs().max())


def check_equal_to_dense(dense, routed, batch, seq, vocab=101, **dense_kwargs):
    g = torch.Generator().manual_seed(batch * 1000 + seq)
    tokens, ids = torch.randint(0, vocab, (batch, seq), generator=g), torch.randint(0, 3, (batch, seq), generator=g)
    with torch.no_grad():
        want = dense(tokens, **dense_kwargs).logits
        got = routed(tokens, modality_ids=ids).logits
    assert relative_error(got, want) <= TOLERANCE, (batch, seq)


def test_hf_mamba_trained_at_a_length_equal_to_its_hidden_size():
    """transformers' Mamba loops over time in Python (no mamba_ssm kernels in this path), so export
    specialises the length and a call at a new length captures again: at seq == hidden size the
    projections' token dims are only told apart by provenance."""
    torch.manual_seed(0)
    dense = T.MambaForCausalLM(T.MambaConfig(num_hidden_layers=2, hidden_size=16, state_size=4, vocab_size=101,
                                             intermediate_size=32, use_mambapy=False)).train()
    routed = sparsify.convert(dense, modalities=3).train()
    for batch, seq in [(2, 16), (16, 16), (3, 32)]:   # seq == hidden, then batch == seq == hidden
        check_equal_to_dense(dense, routed, batch, seq, use_cache=False)
    assert len({id(p) for p in routed.parameters()}) == len(list(routed.parameters()))  # one set of parameters


def test_llama_called_at_its_hidden_size_and_head_count():
    torch.manual_seed(0)
    dense = T.LlamaForCausalLM(T.LlamaConfig(num_hidden_layers=2, hidden_size=8, intermediate_size=16,
                                             num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                                             vocab_size=101, max_position_embeddings=64)).eval()
    routed = sparsify.convert(dense, modalities=3)
    for batch, seq in [(8, 2), (2, 8), (8, 8), (2, 2), (1, 8), (8, 1)]:
        check_equal_to_dense(dense, routed, batch, seq, use_cache=False)


def tiny_bamba(chunk: int):
    """A Mamba2 layer (chunked SSD scan) then an attention layer."""
    torch.manual_seed(0)
    return T.BambaForCausalLM(T.BambaConfig(
        vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8,
        mamba_chunk_size=chunk, attn_layer_indices=[1])).eval()


@pytest.fixture(scope="module")
def bamba():
    from transformers.models.bamba import modeling_bamba

    original_scan = modeling_bamba.mamba2_chunk_scan
    dense = tiny_bamba(chunk=4)
    routed = sparsify.convert(dense, modalities=3)
    assert modeling_bamba.mamba2_chunk_scan is original_scan  # the frontend's graph form only while capturing
    return dense, routed


def test_chunked_scan_hybrid_at_every_length(bamba):
    """Bamba's PyTorch scan pads the sequence to a multiple of its chunk (4) and reshapes it into chunks: a
    graph of that code is valid for one padding class and chunk count. While capturing, the transformers
    frontend makes the scan the sparsify SSD op, so one graph serves every length from 2 on (a length of 1 is
    its own size class); the re-capture a padding class needs is tested on OneChunkPad below."""
    dense, routed = bamba
    for seq in range(1, 3 * 4 + 2):
        check_equal_to_dense(dense, routed, 3 if seq % 2 else 2, seq, use_cache=False)
    graphs = [entry for entries in routed._graphs.values() for entry in entries]
    assert len(graphs) == 2
    for entry in graphs:
        nodes = entry.routed.graph_module.graph.nodes
        assert sum(node.target == torch.ops.sparsify.ssd_scan.default for node in nodes) == 1


def test_the_reported_case_batch_2_seq_16_then_batch_3_seq_24():
    dense = tiny_bamba(chunk=16)
    routed = sparsify.convert(dense, modalities=3)
    for batch, seq in [(2, 16), (3, 24)]:
        check_equal_to_dense(dense, routed, batch, seq, use_cache=False)


class OneChunkPad(nn.Module):
    """Pads the sequence to a multiple of 8 and splits it into chunks, like SSD scans."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4)])

    def forward(self, x):
        batch, seq, d = x.shape
        h = self.layers[0](x)
        chunks = F.pad(h, (0, 0, 0, (8 - seq % 8) % 8)).view(batch, -1, 8, d)
        return (chunks * chunks.sum(1, keepdim=True)).reshape(batch, -1, d)[:, :seq]


def test_a_graph_is_reused_only_where_its_guards_and_size_classes_hold():
    captured = capture(OneChunkPad(), {"x": torch.randn(2, 5, 4)})     # one chunk, padding 3
    assert captured.accepts([torch.randn(3, 6, 4)])                     # one chunk, padding 2
    assert not captured.accepts([torch.randn(2, 8, 4)])                 # padding 0 (a guard export recorded)
    assert not captured.accepts([torch.randn(2, 12, 4)])                # two chunks (a guard)
    assert not captured.accepts([torch.randn(2, 7, 4)])                 # padding 1: a size of 1 in the graph
    dense = OneChunkPad()
    routed = sparsify.convert(dense, 3, example_inputs=(torch.randn(2, 5, 4),))
    for seq in (5, 8, 12, 17, 3, 1, 7):
        x, ids = torch.randn(2, seq, 4), torch.randint(0, 3, (2, seq))
        with torch.no_grad():
            assert relative_error(routed(x, modality_ids=ids), dense(x)) <= TOLERANCE
