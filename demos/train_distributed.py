"""Train a routed (MoT) model on many processes: the README's recipe as a script for torchrun.

    torchrun --nproc_per_node 2 demos/train_distributed.py --steps 20 --out demos/out/distributed
    torchrun --nproc_per_node 2 demos/train_distributed.py --steps 20 --out demos/out/distributed --resume

gloo on CPU, nccl on GPU. Batches of tokens and modality ids come from the training demo's corpus (text,
image and signal tokens interleaved), drawn from a generator seeded by the step, so a resumed run sees the
batches the uninterrupted one would. Each step: precaptured graphs, activation checkpointing per block,
sparsify.fully_shard per block then the root (fp32 here, so a resumed run can be compared exactly), AdamW.
Rank 0 logs the loss per modality to <out>/losses.jsonl; a DCP checkpoint of model and optimizer is
written every --checkpoint-every steps to <out>/checkpoints/step-<N>; --resume continues from the last.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (apply_activation_checkpointing,
                                                                         checkpoint_wrapper)
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_multimodal as corpus  # noqa: E402  (the training demo's corpus and model sizes)

import sparsify  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences), split over ranks")
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=("default", "tiny"), default="tiny")
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--stop-after", type=int, default=None, help="stop after this step (to try --resume)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument("--out", type=Path, default=Path("demos/out/distributed"))
    return parser.parse_args(argv)


def batch_for(step: int, pools, args) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step: the same in every run and on every rank."""
    return corpus.sequences(pools, args.batch, args.length, np.random.default_rng([args.seed, step]))


def last_checkpoint(out: Path) -> tuple[int, Path] | None:
    steps = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*") if (p / ".metadata").exists())
    return (steps[-1], out / "checkpoints" / f"step-{steps[-1]}") if steps else None


def main(argv=None):
    args = parse_args(argv)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if backend == "nccl" else "cpu")
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} is not divisible by the {world} processes")
    pools, _ = corpus.split_pools(args.seed)
    torch.manual_seed(args.seed)   # the same initial weights on every rank
    dense = corpus.dense_models(args.size, args.length)["transformer"].to(device)
    routed = sparsify.convert(dense, modalities=3, init="independent").train()
    mine = slice(rank * args.batch // world, (rank + 1) * args.batch // world)
    tokens, ids = batch_for(0, pools, args)
    routed.precapture(tokens[mine, :-1].to(device), modality_ids=ids[mine, :-1].to(device))
    apply_activation_checkpointing(routed, checkpoint_wrapper_fn=checkpoint_wrapper,
                                   check_fn=lambda m: m in set(routed.model.layers))
    for layer in routed.model.layers:
        sparsify.fully_shard(layer)
    sparsify.fully_shard(routed)
    optimizer = torch.optim.AdamW(routed.parameters(), lr=args.lr)

    start = 1
    if args.resume:
        found = last_checkpoint(args.out)
        if found is None:
            raise SystemExit(f"--resume: no checkpoint in {args.out / 'checkpoints'}")
        step, path = found
        state = {"model": get_model_state_dict(routed), "optim": get_optimizer_state_dict(routed, optimizer)}
        dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(routed, state["model"])
        set_optimizer_state_dict(routed, optimizer, state["optim"])
        start = step + 1
        if rank == 0:
            print(f"resumed from {path} (step {step})", flush=True)
    elif rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "losses.jsonl").write_text("")

    for step in range(start, args.steps + 1):
        tokens, ids = batch_for(step, pools, args)
        tokens, ids = tokens[mine].to(device), ids[mine].to(device)
        losses = corpus.next_token_losses(routed, tokens, ids, routed=True)
        loss = losses.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        # per modality of the predicted token, summed over ranks
        targets = ids[:, 1:]
        sums = torch.stack([losses.detach()[targets == m].sum() for m in range(3)] +
                           [(targets == m).sum().to(losses.dtype) for m in range(3)])
        dist.all_reduce(sums)
        per_modality = (sums[:3] / sums[3:].clamp(min=1)).tolist()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0:
            record = {"step": step, "loss": total.item() / world,
                      **{name: value for name, value in zip(corpus.MODALITIES, per_modality)}}
            with open(args.out / "losses.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")
            print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()),
                  flush=True)
        if step % args.checkpoint_every == 0 or step == args.steps:
            dcp.save({"model": get_model_state_dict(routed), "optim": get_optimizer_state_dict(routed, optimizer)},
                     checkpoint_id=str(args.out / "checkpoints" / f"step-{step}"))
        if args.stop_after is not None and step >= args.stop_after:
            break
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
