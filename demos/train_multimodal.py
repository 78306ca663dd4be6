"""Dense vs Mixture-of-Transformers vs Mixture-of-Mamba on a mixed-modality corpus, on a laptop.

    python demos/train_multimodal.py [--steps 600] [--seed 0] [--seeds 1] [--device cpu] [--init independent|copy]

The corpus uses nothing that has to be downloaded:
- text:   bytes of the docstrings of Python's own standard library (256 tokens),
- image:  scikit-learn's 8x8 handwritten digits, 17 grey levels, row by row (17 tokens),
- signal: a synthetic speech-like 1-D signal (decaying sums of sinusoids with noise, generated from the
          seed), mu-law quantised to 32 levels (32 tokens).
One vocabulary with disjoint ranges per modality; every sequence interleaves segments of the three
modalities, and `modality_ids` say which is which.

From one seed and on the same batches it trains a dense Llama-style transformer and its
`sparsify.convert`-ed Mixture-of-Transformers, and a dense Mamba and its Mixture-of-Mamba
(init="independent", as in the papers; --init copy starts every copy at the dense weights, the upcycling
case). Routing adds no FLOPs per token. It evaluates on held-out data per modality (next-token loss,
grouped by the modality of the predicted token), prints, per modality, the step at which each routed
model first reaches its dense model's final held-out loss as a fraction of the dense model's steps, and
writes the curves as CSV and PNG. `--seeds N` repeats the whole run for seeds seed .. seed + N - 1 (corpus
split, batches, initialisation) and reports the mean and the spread (min-max) over them, so that a difference
can be told from seed noise.
"""
from __future__ import annotations

import argparse
import copy
import csv
import importlib
import inspect
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import sparsify

MODALITIES = ("text", "image", "signal")
TEXT_TOKENS, IMAGE_LEVELS, SIGNAL_LEVELS = 256, 17, 32
OFFSETS = (0, TEXT_TOKENS, TEXT_TOKENS + IMAGE_LEVELS)
VOCAB = TEXT_TOKENS + IMAGE_LEVELS + SIGNAL_LEVELS
SIGNAL_LENGTH = 48
# Modules whose docstrings make the text corpus: the standard library, so every Python has them.
DOC_MODULES = ("argparse", "asyncio", "bisect", "collections", "contextlib", "csv", "dataclasses", "datetime",
               "decimal", "difflib", "email", "enum", "fractions", "functools", "heapq", "http.client", "inspect",
               "itertools", "json", "logging", "os", "pathlib", "pickle", "pprint", "random", "re", "shutil",
               "statistics", "string", "tempfile", "textwrap", "typing", "unittest", "urllib.parse", "zipfile")


# -- the corpus ------------------------------------------------------------------------------------------
def text_documents() -> list[bytes]:
    """Docstrings of the modules and of the classes and functions they define. Only what a module defines: its
    attributes also hold submodules and names that other imports add (which other imports happen depends on
    what ran before in the process), and the corpus must be the same in every run."""
    docs = []
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        defined = [m for _, m in sorted(inspect.getmembers(module), key=lambda m: m[0])
                   if (inspect.isclass(m) or inspect.isfunction(m)) and getattr(m, "__module__", None) == name]
        for member in [module] + defined:
            doc = inspect.getdoc(member)
            if doc and len(doc) >= 80:
                docs.append(doc.encode("utf-8"))
    return sorted(set(docs))


def digit_images() -> np.ndarray:
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    return load_digits().images.astype(np.int64).reshape(-1, 64)  # grey levels 0..16


def signals(count: int, rng: np.random.Generator) -> np.ndarray:
    """Speech-like snippets: 1-3 decaying sinusoids plus noise, mu-law quantised to SIGNAL_LEVELS levels."""
    t = np.arange(SIGNAL_LENGTH)
    out = np.zeros((count, SIGNAL_LENGTH))
    for i in range(count):
        for _ in range(rng.integers(1, 4)):
            frequency, phase, decay = rng.uniform(0.02, 0.25), rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.06)
            out[i] += rng.uniform(0.2, 0.6) * np.sin(2 * np.pi * frequency * t + phase) * np.exp(-decay * t)
        out[i] += 0.03 * rng.standard_normal(SIGNAL_LENGTH)
    mu = SIGNAL_LEVELS - 1
    companded = np.sign(out) * np.log1p(mu * np.minimum(np.abs(out), 1.0)) / np.log1p(mu)
    return np.clip(np.round((companded + 1) / 2 * mu), 0, mu).astype(np.int64)


@dataclass
class Pools:
    """Tokens of each modality, already offset into the shared vocabulary."""
    text: list[np.ndarray]
    image: np.ndarray
    signal: np.ndarray


def split_pools(seed: int, held_out: float = 0.15) -> tuple[Pools, Pools]:
    rng = np.random.default_rng(seed)
    docs = [np.frombuffer(d, dtype=np.uint8).astype(np.int64) for d in text_documents()]
    images = digit_images() + OFFSETS[1]
    waves = signals(2000, rng) + OFFSETS[2]
    order_docs, order_images = rng.permutation(len(docs)), rng.permutation(len(images))

    def cut(n):
        return int(n * (1 - held_out))

    train = Pools([docs[i] for i in order_docs[:cut(len(docs))]], images[order_images[:cut(len(images))]],
                  waves[:cut(len(waves))])
    test = Pools([docs[i] for i in order_docs[cut(len(docs)):]], images[order_images[cut(len(images)):]],
                 waves[cut(len(waves)):])
    return train, test


def sequences(pools: Pools, count: int, length: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` sequences of `length` + 1 tokens interleaving text, image and signal segments; their modality ids."""
    tokens = np.zeros((count, length + 1), dtype=np.int64)
    ids = np.zeros((count, length + 1), dtype=np.int64)
    for row in range(count):
        parts, kinds = [], []
        while sum(len(p) for p in parts) < length + 1:
            kind = int(rng.integers(0, 3))
            if kind == 0:
                doc = pools.text[rng.integers(len(pools.text))]
                size = int(rng.integers(24, 65))
                start = int(rng.integers(0, max(1, len(doc) - size)))
                part = doc[start:start + size]
            elif kind == 1:
                part = pools.image[rng.integers(len(pools.image))]
            else:
                part = pools.signal[rng.integers(len(pools.signal))]
            parts.append(part)
            kinds.append(np.full(len(part), kind))
        tokens[row] = np.concatenate(parts)[:length + 1]
        ids[row] = np.concatenate(kinds)[:length + 1]
    return torch.from_numpy(tokens), torch.from_numpy(ids)


# -- the models --------------------------------------------------------------------------------------------
def dense_models(size: str, length: int) -> dict[str, torch.nn.Module]:
    import transformers as T

    hidden, layers = (64, 2) if size == "default" else (32, 1)
    transformer = T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=length + 1))
    mamba = T.MambaForCausalLM(T.MambaConfig(
        vocab_size=VOCAB, hidden_size=hidden, state_size=8, num_hidden_layers=layers, expand=2,
        time_step_rank=max(hidden // 16, 1)))
    return {"transformer": transformer, "mamba": mamba}


def next_token_losses(model, tokens, ids, routed: bool) -> torch.Tensor:
    """Per-token next-token cross-entropy, [batch, length]."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    kwargs = {"modality_ids": ids[:, :-1]} if routed else {"use_cache": False}
    logits = model(inputs, **kwargs).logits
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), targets.reshape(-1), reduction="none").view(
        targets.shape)


@torch.no_grad()
def held_out_loss(model, tokens, ids, routed: bool) -> list[float]:
    """Mean held-out loss per modality of the predicted token."""
    was_training = model.training
    model.eval()
    losses = next_token_losses(model, tokens, ids, routed)
    model.train(was_training)
    target_ids = ids[:, 1:]
    return [float(losses[target_ids == m].mean()) for m in range(len(MODALITIES))]


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(name, model, routed: bool, batches, held_out, args, bar) -> tuple[list[dict], list[float]]:
    model.to(args.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    curve, train_losses = [], []
    evaluate_at = set(range(0, args.steps, args.eval_every)) | {args.steps}
    for step in range(args.steps + 1):
        if step in evaluate_at:
            losses = held_out_loss(model, *held_out, routed)
            curve += [{"model": name, "step": step, "modality": m, "loss": loss} for m, loss in zip(MODALITIES, losses)]
        if step == args.steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        tokens, ids = (t.to(args.device) for t in batches[step])
        loss = next_token_losses(model, tokens, ids, routed).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        train_losses.append(float(loss.detach()))
        bar.set_postfix_str(f"{name} loss {train_losses[-1]:.3f}")
        bar.update(1)
    return curve, train_losses


# -- the report ---------------------------------------------------------------------------------------------
PAIRS = (("transformer", "MoT"), ("mamba", "MoM"))


def steps_to_match(curve: list[dict], dense: str, routed: str, steps: int) -> dict[str, float | None]:
    """Per modality: the first step at which `routed` reaches `dense`'s final held-out loss, / dense steps
    (one seed's curve)."""
    out = {}
    for modality in MODALITIES:
        target = next(r["loss"] for r in curve if r["model"] == dense and r["modality"] == modality
                      and r["step"] == steps)
        reached = [r["step"] for r in curve if r["model"] == routed and r["modality"] == modality
                   and r["loss"] <= target]
        out[modality] = min(reached) / steps if reached else None
    return out


def seeds_of(curve: list[dict]) -> list[int]:
    return sorted({r.get("seed", 0) for r in curve})


def spread(values: list[float], percent: bool = False) -> str:
    """mean [min, max] over seeds (the mean alone for one seed)."""
    show = (lambda v: f"{v:.0%}") if percent else (lambda v: f"{v:.3f}")
    mean = sum(values) / len(values)
    return show(mean) if len(values) == 1 else f"{show(mean)} [{show(min(values))}, {show(max(values))}]"


def report(curve: list[dict], steps: int) -> str:
    """Markdown: final held-out loss per model and modality, and the routed models' steps to the dense models'
    final loss, as mean [min, max] over the seeds (a seed where it was not reached counts as 'not reached')."""
    seeds = seeds_of(curve)
    lines = [f"held-out loss at the end (lower is better), mean [min, max] over {len(seeds)} seed(s), and the "
             "fraction of the dense model's steps the routed model needed to reach the dense model's final loss "
             "(< 100%: the routed model is ahead):", "",
             "| modality | " + " | ".join(name for pair in PAIRS for name in pair) + " | "
             + " | ".join(f"{r} steps to dense final" for _, r in PAIRS) + " |",
             "|---" * (1 + 2 * len(PAIRS) + len(PAIRS)) + "|"]
    final = {(r.get("seed", 0), r["model"], r["modality"]): r["loss"] for r in curve if r["step"] == steps}
    per_seed = [[r for r in curve if r.get("seed", 0) == seed] for seed in seeds]
    fractions = {routed: [steps_to_match(c, dense, routed, steps) for c in per_seed] for dense, routed in PAIRS}
    for modality in MODALITIES:
        cells = [spread([final[(seed, name, modality)] for seed in seeds]) for pair in PAIRS for name in pair]
        for _, routed in PAIRS:
            reached = [f[modality] for f in fractions[routed]]
            missing = sum(v is None for v in reached)
            cells.append("not reached" if missing == len(reached) else
                         spread([v for v in reached if v is not None], percent=True)
                         + (f" (not reached in {missing} of {len(reached)})" if missing else ""))
        lines.append(f"| {modality} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(curve: list[dict], out: Path, args) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / "train_multimodal.csv", out / "train_multimodal.png"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["seed", "model", "step", "modality", "loss"])
        writer.writeheader()
        writer.writerows(curve)
    figure, axes = plt.subplots(1, len(MODALITIES), figsize=(4.2 * len(MODALITIES), 3.6), sharex=True)
    styles = {"transformer": ("tab:blue", "--"), "MoT": ("tab:blue", "-"), "mamba": ("tab:orange", "--"),
              "MoM": ("tab:orange", "-")}
    seeds = seeds_of(curve)
    for axis, modality in zip(axes, MODALITIES):
        for model, (color, line) in styles.items():
            by_step: dict[int, list[float]] = {}
            for r in curve:
                if r["model"] == model and r["modality"] == modality:
                    by_step.setdefault(r["step"], []).append(r["loss"])
            steps = sorted(by_step)
            axis.plot(steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], color=color, linestyle=line,
                      label=model)
            if len(seeds) > 1:  # the spread over seeds
                axis.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                                  color=color, alpha=0.15, linewidth=0)
        axis.set_title(f"{modality}: held-out loss")
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("next-token cross-entropy")
    axes[-1].legend()
    seed_text = f"seed {args.seed}" if len(seeds) == 1 else f"mean and min-max of {len(seeds)} seeds"
    figure.suptitle(f"dense (dashed) vs routed (solid), init={args.init}, {seed_text}, {args.steps} steps")
    figure.tight_layout()
    figure.savefig(png_path, dpi=110)
    plt.close(figure)
    return csv_path, png_path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=1, help="repeat for seeds seed .. seed + N - 1")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--init", choices=("independent", "copy"), default="independent")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--size", choices=("default", "tiny"), default="default")
    parser.add_argument("--out", type=Path, default=Path("demos/out"))
    return parser.parse_args(argv)


def run_seed(seed: int, args, bar) -> tuple[list[dict], dict[str, list[float]]]:
    """Corpus split, batches, models and training for one seed: (curve rows, training losses per model)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train_pools, test_pools = split_pools(seed)
    batches = [sequences(train_pools, args.batch, args.length, rng) for _ in range(args.steps)]
    held_out = sequences(test_pools, 4 * args.batch, args.length, rng)
    dense = dense_models(args.size, args.length)
    example = (batches[0][0][:2, :-1],)
    models = {}
    for family, routed_name in PAIRS:
        models[family] = (dense[family], False)
        routed = sparsify.convert(copy.deepcopy(dense[family]), modalities=len(MODALITIES), init=args.init,
                                  example_inputs=example, example_kwargs={"use_cache": False})
        models[routed_name] = (routed, True)
    if seed == args.seed:
        for name, (model, _) in models.items():
            count = sum(p.numel() for p in model.parameters())
            bar.write(f"{name:12} {count:>9,} parameters")
    curve, train_losses = [], {}
    for name, (model, routed) in models.items():
        points, losses = train(name, model, routed, batches, held_out, args, bar)
        curve += [{"seed": seed, **point} for point in points]
        train_losses[name] = losses
    return curve, train_losses


def main(argv=None) -> dict:
    args = parse_args(argv)
    seeds = list(range(args.seed, args.seed + args.seeds))
    curve, train_losses = [], {}
    started = time.perf_counter()
    with tqdm(total=args.steps * 2 * len(PAIRS) * len(seeds), desc="training", file=sys.stdout,
              mininterval=2) as bar:
        for seed in seeds:
            points, losses = run_seed(seed, args, bar)
            curve += points
            train_losses.update(losses if len(seeds) == 1 else {f"{name} seed {seed}": v for name, v in losses.items()})
    print(f"trained 4 models x {args.steps} steps x {len(seeds)} seed(s) in {time.perf_counter() - started:.0f} s")
    print(report(curve, args.steps))
    csv_path, png_path = write_outputs(curve, args.out, args)
    print(f"wrote {csv_path} and {png_path}")
    return {"curve": curve, "train_losses": train_losses, "csv": csv_path, "png": png_path}


if __name__ == "__main__":
    main()
