"""The `sparsify` command's entry point: its arguments, parsed and checked before anything heavy is imported.

A module of its own, outside the `sparsify` package: importing any part of the package imports torch (the
routed ops register on `import sparsify`), ~4 s here, and `sparsify --help` or a bad argument should answer at
once. After parsing, `sparsify.cli` does the work. Exit codes: 0 ok, 1 verification failed, 2 bad input (one
line on stderr saying what and how to fix, no traceback), 3 a failure inside sparsify (its message, no
traceback).
"""
from __future__ import annotations

import argparse
import os
import sys

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
# The library's choices (plan.POLICIES, plan.INIT_MODES, convert_checkpoint.DTYPE_CHOICES; a test keeps them
# equal), spelled here so that `--help` and a bad choice answer before torch is imported.
POLICIES = ("auto", "mot", "mom", "all", "none")
INIT_MODES = ("copy", "independent")
DTYPES = ("keep", "float32", "bfloat16", "float16")
MAX_MODALITIES = 64  # api.MAX_MODALITIES


def _size(text: str) -> int:
    units = {"kb": 2**10, "mb": 2**20, "gb": 2**30}
    lowered = text.strip().lower()
    for suffix, factor in units.items():
        if lowered.endswith(suffix):
            return int(float(lowered[: -len(suffix)]) * factor)
    return int(lowered)


def _regex(text: str) -> str:
    """A --include / --exclude pattern, checked when the arguments are parsed (before any work)."""
    import re

    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid regular expression: {e}") from None
    return text


def _factory(text: str) -> str:
    """--model's form, checked when parsed (importing it is the command's work): package.module:factory."""
    module, _, attr = text.partition(":")
    if not module or not attr or not all(part.isidentifier() for part in [*module.split("."), *attr.split(".")]):
        raise argparse.ArgumentTypeError(f"{text!r} must look like package.module:factory (a module importable "
                                         "from here and the function in it that builds the dense model)")
    return text


def _image_path(text: str) -> str:
    """An image to write, checked when the arguments are parsed: a suffix matplotlib writes, a directory that exists."""
    import os

    if os.path.splitext(text)[1].lower() not in (".png", ".svg", ".pdf"):
        raise argparse.ArgumentTypeError(f"{text!r}: write the heatmap as .png, .svg or .pdf")
    if not os.path.isdir(os.path.dirname(text) or "."):
        raise argparse.ArgumentTypeError(f"{text!r}: the directory {os.path.dirname(text)!r} does not exist")
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsify", description="Modality-routed models from dense checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)

    def routing_options(p, modalities_required):
        p.add_argument("--modalities", type=int, required=modalities_required, default=3,
                       help=f"how many modalities (at most {MAX_MODALITIES} unless --allow-many-modalities)")
        p.add_argument("--allow-many-modalities", action="store_true",
                       help=f"allow more than {MAX_MODALITIES} modalities (every routed weight copied that often)")
        p.add_argument("--policy", default="auto", choices=POLICIES, help="which parameters to route (default auto)")
        p.add_argument("--include", type=_regex, help="regex: also route parameters whose FQN matches")
        p.add_argument("--exclude", type=_regex, help="regex: keep parameters whose FQN matches shared")
        p.add_argument("--model", type=_factory, help="package.module:factory building the dense module (state-dict checkpoints); "
                                       "it may return (module, example_inputs)")

    convert = commands.add_parser("convert", help="convert a dense checkpoint into a routed one")
    convert.add_argument("src", help="Hugging Face model directory, .safetensors or .pt state dict")
    convert.add_argument("-o", "--output", required=True, help="output directory (written atomically)")
    routing_options(convert, modalities_required=True)
    convert.add_argument("--init", default="copy", choices=INIT_MODES, help="copies start as the dense weight "
                                                                              "(copy) or re-initialised")
    convert.add_argument("--dtype", default="keep", choices=DTYPES, help="dtype of the written tensors")
    convert.add_argument("--no-verify", action="store_true", help="skip comparing the result with the dense model")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    convert.add_argument("--max-shard-size", type=_size, default="5GB", help="e.g. 5GB, 500MB")
    convert.add_argument("--quiet", action="store_true", help="print nothing but errors")

    inspect = commands.add_parser("inspect", help="what a checkpoint routes (or would route), params before/after")
    inspect.add_argument("path")
    routing_options(inspect, modalities_required=False)
    inspect.add_argument("--graph", metavar="OUT.svg", type=_image_path,
                         help="a routed checkpoint: draw its routed graph (.svg, .png or .pdf)")
    inspect.add_argument("--drift", metavar="OUT.png", type=_image_path,
                         help="a routed checkpoint: draw how far each modality's copies are apart (heatmap)")
    inspect.add_argument("--reference", metavar="DENSE",
                         help="with --drift: the dense checkpoint converted from, for the cosines of the updates")

    add = commands.add_parser("add-modality", help="a routed checkpoint with one more modality")
    add.add_argument("routed", help="routed checkpoint directory (sparsify.save or sparsify convert)")
    add.add_argument("-o", "--output", required=True, help="output directory (written atomically)")
    start = add.add_mutually_exclusive_group()
    start.add_argument("--copy-from", type=int, default=0, metavar="K",
                       help="the new modality starts as modality K's copies (default 0)")
    start.add_argument("--independent", action="store_true", help="re-initialise the new modality's copies")
    add.add_argument("--model", type=_factory, help="package.module:factory building the dense module (non-Hugging Face models)")
    add.add_argument("--overwrite", action="store_true", help="replace an existing output directory")

    verify = commands.add_parser("verify", help="compare a routed checkpoint with its dense one")
    verify.add_argument("dense")
    verify.add_argument("routed")
    verify.add_argument("--model", type=_factory, help="package.module:factory, for state-dict checkpoints")
    return parser


def check_before_work(args) -> str | None:
    """What the arguments say that is wrong and needs no model to tell (an output directory that exists), or
    None."""
    modalities = getattr(args, "modalities", None)
    if modalities is not None and modalities < 1:
        return f"--modalities must be a positive int (e.g. 3 for text, image, speech), got {modalities}"
    if modalities is not None and modalities > MAX_MODALITIES and not args.allow_many_modalities:
        return (f"--modalities {modalities} would make {modalities} copies of every routed parameter; more than "
                f"{MAX_MODALITIES} needs --allow-many-modalities")
    output = getattr(args, "output", None)
    if output is not None and os.path.exists(output) and not args.overwrite:
        return f"{output} already exists; choose a new path or pass overwrite (--overwrite)"
    for name in ("src", "path", "routed", "dense"):
        path = getattr(args, name, None)
        if isinstance(path, str) and not os.path.exists(path):
            return f"{path} does not exist"
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse printed help (0) or a usage error (2): an exit code, as every error here
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    problem = check_before_work(args)
    if problem is not None:
        print(f"sparsify: error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from sparsify import cli  # torch, transformers: only now

    return cli.execute(args)


if __name__ == "__main__":
    sys.exit(main())
