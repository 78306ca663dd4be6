"""Peak memory and wall time of `sparsify convert` on a generated >= 1 GB checkpoint, as ratios.

Writes a random-weight Llama checkpoint (Hugging Face directory, fp32) without ever
holding the model in memory, converts it with `--no-verify` in a child process and
reads the child's peak RSS (resource.getrusage). Also measures a child that only
imports sparsify and transformers, the fixed cost of the interpreter and libraries.
The wall time is compared with copying the bytes the conversion wrote (`shutil.copyfile`
of every output file, then fsync as the converter does, same run): the floor for any converter
that writes them durably. Each timed phase starts after os.sync(), so writing back one phase's
dirty pages is not charged to the next (on this machine that moved the ratio by 1x).
Targets: peak RSS / checkpoint size <= 0.5; convert time / copy time <= 2.
Usage: python benchmarks/bench_convert.py [--layers 20] [--workdir DIR]
"""
import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def write_dense_checkpoint(directory: Path, layers: int) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsify.safetensors_io import OutputTensor, write_checkpoint

    config = LlamaConfig(num_hidden_layers=layers, hidden_size=1024, intermediate_size=2816,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                         tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)

    def random_chunks(numel):
        def chunks():
            for start in range(0, numel, 2**22):
                yield torch.randn(min(2**22, numel - start), generator=generator) * 0.02
        return chunks

    tensors = [OutputTensor(name, torch.float32, tuple(t.shape), random_chunks(math.prod(t.shape)))
               for name, t in model.state_dict().items()]
    directory.mkdir(parents=True)
    write_checkpoint(directory, tensors, max_shard_bytes=2**31)
    config.save_pretrained(directory)
    return sum(t.nbytes for t in tensors)


def durable(path: Path) -> None:
    """fsync, as the converter does for every file it writes (a rename then never exposes a half-written
    checkpoint after a crash): the copy it is compared with gives the same guarantee."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def child_peak_rss(command) -> tuple[int, float]:
    """Peak RSS in bytes of one child process (a fresh process per measurement)."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", probe, *command], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1]) * 1024, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--modalities", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(dir=args.workdir, prefix="bench-convert-"))
    try:
        size = write_dense_checkpoint(workdir / "dense", args.layers)
        baseline, import_seconds = child_peak_rss([sys.executable, "-c", "import sparsify, transformers"])
        os.sync()  # the dense checkpoint's dirty pages are written back before the timed conversion starts
        peak, seconds = child_peak_rss([sys.executable, "-m", "sparsify.cli", "convert", str(workdir / "dense"),
                                        "-o", str(workdir / "routed"), "--modalities", str(args.modalities),
                                        "--no-verify", "--quiet"])
        written = sum(p.stat().st_size for p in (workdir / "routed").iterdir())
        (workdir / "copy").mkdir()
        os.sync()
        start = time.perf_counter()
        for path in (workdir / "routed").iterdir():
            shutil.copyfile(path, workdir / "copy" / path.name)
            durable(workdir / "copy" / path.name)
        copy_seconds = time.perf_counter() - start
        print(f"dense checkpoint {size / 2**30:.2f} GiB fp32 -> routed {written / 2**30:.2f} GiB "
              f"({args.modalities} modalities) in {seconds:.1f} s")
        print(f"peak RSS of the convert process  {peak / 2**20:8.0f} MiB   {peak / size:.2f}x checkpoint size "
              f"(target <= 0.50)")
        print(f"  of which importing sparsify+transformers alone {baseline / 2**20:.0f} MiB")
        print(f"wall time {seconds:.1f} s vs copying the {written / 2**30:.2f} GiB it wrote {copy_seconds:.1f} s: "
              f"{seconds / copy_seconds:.2f}x (target <= 2); without the {import_seconds:.1f} s of starting Python "
              f"and importing: {(seconds - import_seconds) / copy_seconds:.2f}x")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
