"""Tiny modules that exercise one routing form each (not Hugging Face, no frontend help)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Block(nn.Module):
    """Linear, Conv1D-style addmm with an [in, out] weight, a left matmul (w @ x), LayerNorm, RMSNorm, a bias add."""

    def __init__(self, d=8, hidden=12):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.rms = RMSNorm(d)
        self.up = nn.Linear(d, hidden)
        self.conv1d_weight = nn.Parameter(0.1 * torch.randn(hidden, d))   # [in, out] as GPT-2's Conv1D
        self.conv1d_bias = nn.Parameter(0.1 * torch.randn(d))
        self.left = nn.Parameter(0.1 * torch.randn(d, d))                 # used as left @ x^T (mamba_ssm style)
        self.shift = nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x):
        h = F.gelu(self.up(self.norm(x)))
        batch, seq, _ = x.shape
        flat = torch.addmm(self.conv1d_bias, h.view(-1, h.shape[-1]), self.conv1d_weight).view(batch, seq, -1)
        channels_first = self.left @ flat.transpose(1, 2)                  # [B, d, T]: tokens in the last dim
        return x + self.rms(channels_first.transpose(1, 2)) + self.shift


class ToyLM(nn.Module):
    def __init__(self, vocab=50, d=8, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class SeqFirst(nn.Module):
    """Takes [seq, batch, d]: the token dims come in (seq, batch) order."""

    def __init__(self, d=6):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d, d)])

    def forward(self, x):
        return self.layers[0](x).transpose(0, 1).transpose(0, 1)


class LoopOverTime(nn.Module):
    """A Python loop over the sequence: export specialises the sequence length."""

    def __init__(self, d=6):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d, d)])

    def forward(self, x):
        h = self.layers[0](x)
        state = torch.zeros_like(h[:, 0])
        outs = []
        for t in range(x.shape[1]):
            state = 0.5 * state + h[:, t]
            outs.append(state)
        return torch.stack(outs, 1)


class DataDependent(nn.Module):
    def __init__(self, d=6):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d, d)])

    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value: not capturable
            return self.layers[0](x)
        return x


class WeightInSoftmax(nn.Module):
    """A block parameter used by an op sparsify cannot route."""

    def __init__(self, d=6):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d, d)])

    def forward(self, x):
        return self.layers[0](x) + torch.softmax(self.layers[0].weight, -1).sum()


class AttentionBlock(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        return x + self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True))


class Hybrid(nn.Module):
    """An attention block followed by a block without attention (as in hybrid attention/SSM models)."""

    def __init__(self, vocab=50, d=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([AttentionBlock(d), Block(d)])

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return x


class EagerAttentionBlock(nn.Module):
    """Attention written out: a softmax over the keys, i.e. over a dim as long as the sequence."""

    def __init__(self, d=8):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        return x + torch.softmax(q @ k.transpose(1, 2) / 8 ** 0.5, dim=-1) @ v


class ExpertRouterBlock(nn.Module):
    """A mixture-of-experts layer: its softmax is over 4 experts, not over tokens (no attention)."""

    def __init__(self, d=8, experts=4):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.router = nn.Linear(d, experts)
        self.experts = nn.ModuleList([nn.Linear(d, d) for _ in range(experts)])

    def forward(self, x):
        h = self.norm(x)
        gates = torch.softmax(self.router(h), dim=-1)
        return x + sum(gates[..., i:i + 1] * expert(h) for i, expert in enumerate(self.experts))


class AttentionThenExperts(Hybrid):
    def __init__(self, vocab=50, d=8):
        super().__init__(vocab, d)
        self.layers = nn.ModuleList([EagerAttentionBlock(d), ExpertRouterBlock(d)])


class StepwiseRecurrent(nn.Module):
    """An RNN-style loop applying its projections to one time step at a time: x[:, t]."""

    def __init__(self, d=6):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"inp": nn.Linear(d, d), "rec": nn.Linear(d, d, bias=False),
                                                    "norm": nn.LayerNorm(d)})])

    def forward(self, x):
        cell = self.layers[0]
        state = torch.zeros_like(x[:, 0])
        outs = []
        for t in range(x.shape[1]):
            state = torch.tanh(cell["inp"](cell["norm"](x[:, t])) + cell["rec"](state))
            outs.append(state)
        return torch.stack(outs, 1)


class SeqFirstFlattened(nn.Module):
    """Turns [batch, seq, d] into seq-first order, then projects the flattened (seq * batch) tokens with a
    Conv1D-style addmm: the flattened dim holds tokens seq-major."""

    def __init__(self, d=6):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d, d)])

    def forward(self, x):
        batch, seq, d = x.shape
        layer = self.layers[0]
        seq_first = x.transpose(0, 1).contiguous()
        flat = torch.addmm(layer.bias, seq_first.reshape(-1, d), layer.weight.t())
        return flat.view(seq, batch, d).transpose(0, 1)


class TransposedWeights(nn.Module):
    """Weights applied as x @ w.T (Falcon's FalconLinear) and x @ w.mT: transposes export records as
    numpy_T and mT."""

    def __init__(self, d=6):
        super().__init__()
        self.a = nn.Parameter(0.3 * torch.randn(10, d))
        self.b = nn.Parameter(0.3 * torch.randn(d, 10))

    def forward(self, x):
        return (x @ self.a.T) @ self.b.mT.T.T


class DelayedState(nn.Module):
    """Zaya's delayed value, written out: one projection applied to every token and to a zero state before the
    first, the results shifted one position (position t gets token t-1's projection, position 0 the zero
    state's), then `out` on the shifted sequence; and `start`, applied to the zero state alone."""

    def __init__(self, vocab=50, d=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([nn.ModuleDict({"norm": nn.LayerNorm(d), "delayed": nn.Linear(d, d),
                                                    "start": nn.Linear(d, d), "out": nn.Linear(d, d)})])

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            h = layer["norm"](x)
            state = layer["delayed"](layer["start"](h.new_zeros(h.shape[0], 1, h.shape[-1])))
            x = x + layer["out"](torch.cat([state, layer["delayed"](h)[:, :-1]], dim=1))
        return x


class LearnedPrompt(nn.Module):
    """CPM-Ant's learned prompt, written out: 3 learned positions before the tokens, a block over all of them,
    the prompt cut off at the end."""

    def __init__(self, vocab=50, d=8, prompt=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.prompt = nn.Parameter(torch.randn(prompt, d))
        self.layers = nn.ModuleList([nn.ModuleDict({"norm": nn.LayerNorm(d), "up": nn.Linear(d, 2 * d),
                                                    "down": nn.Linear(2 * d, d)})])

    def forward(self, tokens):
        x = self.embed(tokens)
        x = torch.cat([self.prompt.expand(x.shape[0], -1, -1), x], dim=1)
        for layer in self.layers:
            x = x + layer["down"](torch.relu(layer["up"](layer["norm"](x))))
        return x[:, self.prompt.shape[0]:]


class PredictingStreams(nn.Module):
    """ProphetNet's n-gram predicting stream, written out: a stream of learned positions as long as the
    sequence (no token goes into it) laid out after the tokens, one block over both, its attention chunked
    into the main stream (causal, over itself) and the predicting stream (over both), each projected out on
    its own and concatenated back."""

    def __init__(self, vocab=50, d=8, max_positions=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.positions = nn.Embedding(max_positions, d)
        self.stream = nn.Parameter(torch.randn(d))
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, tokens):
        batch, length = tokens.shape
        position_ids = torch.arange(length, device=tokens.device).expand(batch, length)
        predicting = self.positions(position_ids + 1) + self.stream
        x = torch.cat([self.embed(tokens) + self.positions(position_ids), predicting], dim=1)
        h = self.norm(x)
        main_q, predict_q = self.q(h).chunk(2, dim=1)
        main_k, predict_k = self.k(h).chunk(2, dim=1)
        main_v, predict_v = self.v(h).chunk(2, dim=1)
        main = self.out(F.scaled_dot_product_attention(main_q, main_k, main_v, is_causal=True))
        predict = self.out(F.scaled_dot_product_attention(
            predict_q, torch.cat([main_k, predict_k], 1), torch.cat([main_v, predict_v], 1)))
        x = x + torch.stack([main, predict], dim=1).view(batch, 2 * length, -1)
        return x + self.down(torch.relu(self.up(x)))


class QueryStream(nn.Module):
    """XLNet's query stream, written out: one row per prediction target, each starting from a learned vector
    (no token goes into it) and reading the sequence position that its row of `targets` ([B, rows, T],
    one-hot) picks, then a norm and a feed-forward on the rows."""

    def __init__(self, vocab=50, d=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.query = nn.Parameter(torch.randn(d))
        self.mix, self.norm = nn.Linear(d, d), nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, tokens, targets):
        h = self.embed(tokens)
        g = self.query.expand(targets.shape[0], targets.shape[1], -1)
        g = self.norm(g + torch.einsum("bmt,btd->bmd", targets, self.mix(h)))
        return g + self.down(torch.relu(self.up(g)))
