"""Upcycling a pretrained language model into a multi-modal one, three ways, on a laptop.

    python demos/upcycle.py [--seeds 3] [--pretrain-steps 600] [--steps 200] [--out demos/out]

For each seed: pretrain a dense Llama-style model on the text stream of the training demo's corpus (Python's
docstrings as bytes), then add image and signal tokens (the same corpus: digits and speech-like signals, each
in its own vocabulary range) and fine-tune on mixed sequences three ways, on the same batches:

    (a) dense     the pretrained model fine-tuned as it is
    (b) frozen    Mixture-of-Transformers upcycled with init="copy", the text modality's copies frozen (LMFusion):
                  every parameter routed (embeddings and LM head too), so text computes exactly what it did
    (c) trained   the same Mixture-of-Transformers with every copy trainable

It reports held-out loss per modality after fine-tuning, text forgetting (text loss after minus before, on
text-only held-out sequences: (b)'s is exactly 0 by construction, which the demo checks), image and signal loss
against (a), wall time per step, and the drift between (c)'s copies as a heatmap. Mean and spread (min-max)
over the seeds go into a table and a PNG.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sparsify  # noqa: E402
from train_multimodal import MODALITIES, VOCAB, learning_rate, sequences, split_pools  # noqa: E402

ARMS = ("dense", "frozen", "trained")


def text_sequences(pools, count: int, length: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` text-only sequences of `length` + 1 byte tokens: documents back to back, from a random place."""
    stream = np.concatenate(pools.text)
    starts = rng.integers(0, len(stream) - length - 1, count)
    tokens = np.stack([stream[s:s + length + 1] for s in starts])
    return torch.from_numpy(tokens), torch.zeros(count, length + 1, dtype=torch.long)


def dense_model(hidden: int, layers: int, length: int):
    import transformers as T

    return T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=length + 1))


def token_losses(model, tokens, ids) -> torch.Tensor:
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    routed = isinstance(model, sparsify.RoutedModel)
    logits = model(inputs, **({"modality_ids": ids[:, :-1]} if routed else {"use_cache": False})).logits
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), targets.reshape(-1), reduction="none").view(
        targets.shape)


@torch.no_grad()
def held_out(model, tokens, ids) -> list[float]:
    """Mean held-out loss per modality of the predicted token."""
    was_training = model.training
    model.eval()
    losses = token_losses(model, tokens, ids)
    model.train(was_training)
    return [float(losses[ids[:, 1:] == m].mean()) for m in range(len(MODALITIES))]


def fit(model, parameters, batches, steps: int, lr: float, warmup: int) -> tuple[list[float], list[float]]:
    """AdamW with weight decay, warmup and cosine decay: (training loss, wall time) of each step."""
    model.train()
    optimizer = torch.optim.AdamW(parameters, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    losses, times = [], []
    for step in range(steps):
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup)
        tokens, ids = batches[step]
        loss = token_losses(model, tokens, ids).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        times.append(time.perf_counter() - started)
        losses.append(float(loss.detach()))
    return losses, times


def upcycled(pretrained, example, frozen: bool):
    """Every parameter routed over the three modalities, each copy starting at the pretrained weight; the text
    modality's copies frozen for (b)."""
    return sparsify.convert(copy.deepcopy(pretrained), modalities=len(MODALITIES), policy="all", include="embed",
                            init="copy", example_inputs=example, example_kwargs={"use_cache": False},
                            frozen=[0] if frozen else None)


def run_seed(seed: int, args) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train_pools, test_pools = split_pools(seed)
    pretrain_batches = [text_sequences(train_pools, args.batch, args.length, rng) for _ in range(args.pretrain_steps)]
    text_test = text_sequences(test_pools, 4 * args.batch, args.length, rng)
    mixed_batches = [sequences(train_pools, args.batch, args.length, rng) for _ in range(args.steps)]
    mixed_test = sequences(test_pools, 4 * args.batch, args.length, rng)

    pretrained = dense_model(args.hidden, args.layers, args.length)
    fit(pretrained, pretrained.parameters(), pretrain_batches, args.pretrain_steps, args.lr, args.warmup)
    example = (mixed_batches[0][0][:2, :-1],)
    result = {"seed": seed, "pretrained_text": held_out(pretrained, *text_test)[0]}
    for arm in ARMS:
        model = copy.deepcopy(pretrained) if arm == "dense" else upcycled(pretrained, example, arm == "frozen")
        text_before = held_out(model, *text_test)[0]
        losses, times = fit(model, model.parameters(), mixed_batches, args.steps, args.finetune_lr, args.warmup)
        text_after = held_out(model, *text_test)[0]
        after = held_out(model, *mixed_test)
        result[arm] = {"text_before": text_before, "text_after": text_after, "forgetting": text_after - text_before,
                       "held_out": dict(zip(MODALITIES, after)),
                       "step_ms": 1000 * statistics.median(times[args.warmup:] or times),
                       "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                       "train_losses": losses}
        if arm == "frozen" and result[arm]["forgetting"] != 0.0:
            raise AssertionError(f"seed {seed}: the frozen text modality's loss changed by "
                                 f"{result[arm]['forgetting']!r}; it must be exactly 0")
        if arm == "trained":
            result["drift"] = sparsify.drift(model, reference=pretrained)
    return result


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.3f} [{min(values):.3f}, {max(values):.3f}]" if len(values) > 1 else f"{mean:.3f}"


def report(results: list[dict]) -> str:
    """Markdown: per arm, mean [min, max] over the seeds."""
    seeds = len(results)
    lines = [f"mean [min, max] over {seeds} seed{'s' * (seeds > 1)}; held-out next-token loss, lower is better",
             "", "| | dense (a) | frozen text (b) | all trainable (c) |", "|---|---|---|---|"]

    def row(label, value):
        lines.append(f"| {label} | " + " | ".join(spread([value(r[arm]) for r in results]) for arm in ARMS) + " |")

    row("text loss before fine-tuning (text-only)", lambda a: a["text_before"])
    row("text loss after (text-only)", lambda a: a["text_after"])
    row("text forgetting (after - before)", lambda a: a["forgetting"])
    for modality in MODALITIES:
        row(f"{modality} loss after (mixed)", lambda a, m=modality: a["held_out"][m])
    for modality in MODALITIES[1:]:
        values = {arm: [r[arm]["held_out"][modality] / r["dense"]["held_out"][modality] for r in results]
                  for arm in ARMS}
        lines.append(f"| {modality} loss / dense's | " + " | ".join(spread(values[arm]) for arm in ARMS) + " |")
    row("wall time per step (ms, median)", lambda a: a["step_ms"])
    row("trainable parameters", lambda a: a["trainable"])
    lines[-1] = lines[-1].replace(".000", "")
    return "\n".join(lines)


def plot(results: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(MODALITIES) + 1, figsize=(4.0 * (len(MODALITIES) + 1), 3.4))
    colors = {"dense": "tab:gray", "frozen": "tab:blue", "trained": "tab:orange"}
    panels = [("text forgetting", lambda a: a["forgetting"])] + \
        [(f"{m} held-out loss", lambda a, m=m: a["held_out"][m]) for m in MODALITIES]
    for axis, (title, value) in zip(axes, panels):
        for x, arm in enumerate(ARMS):
            values = [value(r[arm]) for r in results]
            axis.bar(x, statistics.fmean(values), color=colors[arm], alpha=0.8)
            axis.scatter([x] * len(values), values, color="black", s=12, zorder=3)
        axis.set_xticks(range(len(ARMS)), ["(a) dense", "(b) frozen", "(c) trained"])
        axis.set_title(title)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(f"upcycling, {len(results)} seeds (bars: mean, dots: seeds)")
    figure.tight_layout()
    path = out / "upcycle.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps per arm")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=96)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("demos/out"))
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = []
    for seed in range(args.seeds):
        results.append(run_seed(seed, args))
        print(f"seed {seed}: done ({time.perf_counter() - started:.0f} s)", flush=True)
    table = report(results)
    print(table)
    png = plot(results, args.out)
    drift_png = results[0]["drift"].plot(args.out / "upcycle_drift.png",
                                         title="(c) all trainable, seed 0: distance between modalities' copies")
    with open(args.out / "upcycle.json", "w") as f:
        json.dump([{k: v for k, v in r.items() if k != "drift"} for r in results], f)
    (args.out / "upcycle.md").write_text(table + "\n")
    print(f"wrote {png}, {drift_png}, {args.out / 'upcycle.md'} ({time.perf_counter() - started:.0f} s)")
    return {"results": results, "table": table, "png": png, "drift_png": drift_png}


if __name__ == "__main__":
    main()
