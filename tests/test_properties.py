"""Property tests (hypothesis): random small models at random shapes convert exactly and route per token.

Models are stacks of pieces (linear, layer norm, RMSNorm, depthwise causal conv1d, causal attention, a
chunked scan-like recurrence that pads the sequence to its chunk size, and the block forms real models
use: norms right on linears' outputs, grouped-query attention with q/k norms on per-head views, learned
residual scales and gates, a weight used twice in a block, a weight tied between blocks), with feature sizes drawn
deliberately equal to the batch size or the sequence length. Each is converted once (init="copy",
policy="all") at one shape and then called at others, lengths of 1 and lengths that are no multiple of
the chunk included, with 1..8 modalities and id patterns from all-one-modality to one rare token.

- At every call the routed model equals the dense one: fp32, max abs err / max |dense| <= 1e-5.
- Changing modality k's copies changes exactly the outputs that depend on a modality-k token: those
  whose receptive field (the token itself, the conv's window, every earlier token for attention and the
  scan) holds one. The others stay bitwise equal.

A fixed seed (derandomize) and a bounded example count keep this deterministic and within CI's budget.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsify
from tests.toy_models import RMSNorm

CHUNK = 4
KERNEL = 3
TOLERANCE = 1e-5


class LinearPiece(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.proj(x))


class LayerNormPiece(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        with torch.no_grad():
            self.norm.weight.add_(0.1 * torch.randn(d))
            self.norm.bias.add_(0.1 * torch.randn(d))

    def forward(self, x):
        return self.norm(x)


class RMSNormPiece(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = RMSNorm(d)

    def forward(self, x):
        return x + self.norm(x)


class ConvPiece(nn.Module):
    """Depthwise causal conv over time, as Mamba's mixers apply it."""

    def __init__(self, d):
        super().__init__()
        self.conv = nn.Conv1d(d, d, KERNEL, groups=d, padding=KERNEL - 1)

    def forward(self, x):
        return x + self.conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)


class AttentionPiece(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.heads = 2 if d % 2 == 0 else 1
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        batch, seq, d = x.shape
        q, k, v = (t.view(batch, seq, self.heads, d // self.heads).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.out(y.transpose(1, 2).reshape(batch, seq, d))


class ScanPiece(nn.Module):
    """A running sum over time computed the way chunked SSD scans are: pad the sequence to a multiple of
    the chunk, cumsum within chunks, carry chunk totals across, cut the padding off."""

    def __init__(self, d):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        batch, seq, d = x.shape
        h = self.inp(x)
        pad = (CHUNK - seq % CHUNK) % CHUNK
        chunks = F.pad(h, (0, 0, 0, pad)).view(batch, -1, CHUNK, d)
        within = chunks.cumsum(2)
        before = F.pad(within[:, :-1, -1], (0, 0, 1, 0)).cumsum(1)  # sum of all earlier chunks (exactly causal)
        carried = within + before[:, :, None]
        y = carried.reshape(batch, -1, d)[:, :seq]
        return x + self.out(0.3 * y)


class PostNormPiece(nn.Module):
    """Norms right on linears' outputs, as the MoT paper's and Chameleon's blocks put them: an output norm
    (torch.nn.RMSNorm) after a bias-free projection, a sandwich (F.rms_norm before, a written-out LayerNorm
    without a cast after a biased one)."""

    def __init__(self, d):
        super().__init__()
        self.out_proj, self.out_norm = nn.Linear(d, d, bias=False), nn.RMSNorm(d, eps=1e-6)
        self.pre_weight = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.mid_proj = nn.Linear(d, d)
        self.post_weight, self.post_bias = nn.Parameter(1 + 0.1 * torch.randn(d)), nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x):
        x = x + self.out_norm(self.out_proj(x))
        h = self.mid_proj(F.rms_norm(x, (x.shape[-1],), self.pre_weight, 1e-6))
        centered = h - h.mean(-1, keepdim=True)
        h = centered / torch.sqrt(centered.pow(2).mean(-1, keepdim=True) + 1e-5) * self.post_weight + self.post_bias
        return x + h


class QKNormAttentionPiece(nn.Module):
    """Grouped-query attention with q/k RMSNorms over each head's features (per-head views), bias-free
    projections, keys and values repeated to the query heads as Hugging Face's repeat_kv does."""

    def __init__(self, d):
        super().__init__()
        self.kv_heads, self.groups = 1, 2
        self.head_dim = 2
        heads = self.kv_heads * self.groups
        self.q = nn.Linear(d, heads * self.head_dim, bias=False)
        self.kv = nn.Linear(d, 2 * self.kv_heads * self.head_dim, bias=False)
        self.q_norm, self.k_norm = RMSNorm(self.head_dim), nn.RMSNorm(self.head_dim, eps=1e-6)
        self.out = nn.Linear(heads * self.head_dim, d, bias=False)

    def forward(self, x):
        batch, seq, _ = x.shape
        q = self.q_norm(self.q(x).view(batch, seq, -1, self.head_dim)).transpose(1, 2)
        k, v = self.kv(x).view(batch, seq, 2 * self.kv_heads, self.head_dim).transpose(1, 2).chunk(2, dim=1)
        k = self.k_norm(k)
        k, v = (t[:, :, None].expand(batch, self.kv_heads, self.groups, seq, self.head_dim)
                .reshape(batch, -1, seq, self.head_dim) for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.out(y.transpose(1, 2).reshape(batch, seq, -1))


class GatedResidualPiece(nn.Module):
    """A learned residual scale and a sigmoid gate (elementwise parameters), and one weight used twice."""

    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.scale, self.gate = nn.Parameter(0.5 + 0.1 * torch.randn(d)), nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x):
        return x * self.scale + torch.sigmoid(self.gate) * torch.tanh(self.proj(torch.tanh(self.proj(x))))


class TiedPiece(LinearPiece):
    """A linear whose weight is one tensor with every other TiedPiece's of the stack (Stack ties them)."""


PIECES = {"linear": LinearPiece, "post_norm": PostNormPiece, "qk_norm_attention": QKNormAttentionPiece,
          "gated": GatedResidualPiece, "tied": TiedPiece, "layer_norm": LayerNormPiece, "rms_norm": RMSNormPiece, "conv": ConvPiece,
          "attention": AttentionPiece, "scan": ScanPiece}


class Stack(nn.Module):
    def __init__(self, pieces, d):
        super().__init__()
        self.layers = nn.ModuleList(PIECES[name](d) for name in pieces)
        tied = [layer for layer in self.layers if isinstance(layer, TiedPiece)]
        for layer in tied[1:]:
            layer.proj.weight = tied[0].proj.weight

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def tokens_changed_by(pieces, ids: torch.Tensor, k: int) -> torch.Tensor:
    """[batch, seq] bool: which outputs change when modality k's copies change. Every piece routes all
    its parameters per token (policy="all"), so a piece changes token t where t is of modality k or
    where an input it reads changed: its own token (token-wise pieces and residuals), the conv's
    window of KERNEL tokens, every earlier token's keys/values (attention) or running sum (scan)."""
    seq = ids.shape[1]
    t, s = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    own = ids == k
    changed = torch.zeros_like(own)
    for name in pieces:
        if name == "conv":  # the weight copy of the output token, the inputs of its window
            window = ((s <= t) & (s > t - KERNEL)).float()
            changed = own | ((changed.float() @ window.T) > 0)
        elif name in ("attention", "qk_norm_attention", "scan"):  # projections of every token up to t reach t
            changed = ((own | changed).float() @ (s <= t).float().T) > 0
        else:
            changed = own | changed
    return changed


def modality_ids(pattern: str, shape, modalities: int, seed: int) -> torch.Tensor:
    batch, seq = shape
    if pattern == "one":
        return torch.full(shape, modalities - 1, dtype=torch.long)
    if pattern == "alternating":
        return (torch.arange(batch * seq).view(batch, seq) % modalities).long()
    if pattern == "rare":  # one token of the last modality among modality 0
        ids = torch.zeros(shape, dtype=torch.long)
        ids[batch - 1, seq // 2] = modalities - 1
        return ids
    return torch.randint(0, modalities, shape, generator=torch.Generator().manual_seed(seed))


@st.composite
def cases(draw):
    batch, seq = draw(st.integers(1, 3)), draw(st.integers(1, 3 * CHUNK + 1))
    pieces = draw(st.lists(st.sampled_from(sorted(PIECES)), min_size=1, max_size=3))
    d = draw(st.sampled_from([batch, seq, 2 * batch, 4, 6]))  # feature sizes that collide with the tokens'
    d = max(d, 2)
    calls = draw(st.lists(st.tuples(st.sampled_from([1, 2, 3, d]), st.integers(1, 3 * CHUNK + 1)),
                          min_size=1, max_size=2))
    pattern = draw(st.sampled_from(["one", "alternating", "rare", "random"]))
    return dict(pieces=pieces, d=d, capture=(batch, seq), calls=[(batch, d)] + calls,
                modalities=draw(st.integers(1, 8)), pattern=pattern, seed=draw(st.integers(0, 2**16)))


def relative_error(got, want) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


@settings(derandomize=True, max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(cases())
def test_random_models_convert_exactly_and_route_per_token(case):
    torch.manual_seed(case["seed"])
    d, modalities = case["d"], case["modalities"]
    dense = Stack(case["pieces"], d).eval()
    routed = sparsify.convert(dense, modalities, example_inputs=(torch.randn(*case["capture"], d),), policy="all")
    assert routed.plan.params, routed.plan.summary()
    for i, (batch, seq) in enumerate(case["calls"]):
        x = torch.randn(batch, seq, d)
        ids = modality_ids(case["pattern"], (batch, seq), modalities, case["seed"] + i)
        with torch.no_grad():
            want, got = dense(x), routed(x, modality_ids=ids)
        assert relative_error(got, want) <= TOLERANCE, (case, (batch, seq))

    # Per-token routing: perturb the copies of the modality the pattern's last token uses.
    batch, seq = case["calls"][-1]
    x = torch.randn(batch, seq, d)
    ids = modality_ids(case["pattern"], (batch, seq), modalities, case["seed"])
    k = int(ids[-1, -1])
    with torch.no_grad():
        before = routed(x, modality_ids=ids)
        for fqn in routed.plan.routed:
            copy_k = routed.get_parameter(fqn)[k]
            copy_k.add_(0.5 * torch.randn_like(copy_k) + 0.1)
        after = routed(x, modality_ids=ids)
    depends = tokens_changed_by(case["pieces"], ids, k)
    changed = (before - after).abs().amax(-1) > 1e-6 * before.abs().max()
    assert torch.equal(before[~depends], after[~depends]), case
    assert torch.equal(changed, depends), (case, changed, depends)


def test_tokens_changed_by_the_pieces():
    ids = torch.tensor([[0, 1, 0, 0, 0, 0]])
    assert tokens_changed_by(["linear"], ids, 1).tolist() == [[False, True, False, False, False, False]]
    assert tokens_changed_by(["conv"], ids, 1).tolist() == [[False, True, False, False, False, False]]
    assert tokens_changed_by(["linear", "conv"], ids, 1).tolist() == [[False, True, True, True, False, False]]
    assert tokens_changed_by(["scan"], ids, 1).tolist() == [[False, True, True, True, True, True]]
