"""The `sparsify` command: convert, inspect and verify checkpoints on disk.

Exit codes: 0 ok, 1 verification failed, 2 bad input (one line on stderr saying
what and how to fix, no traceback), 3 a failure inside sparsify (its message, no traceback).
"""
from __future__ import annotations

import argparse
import sys

from sparsify.errors import InternalError, SparsifyError, VerificationError, internal_error

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
# The library's choices (plan.POLICIES, plan.INIT_MODES, convert_checkpoint.DTYPE_CHOICES; a test keeps them
# equal), spelled here so that `--help` and a bad choice answer before torch is imported.
POLICIES = ("auto", "mot", "mom", "all", "none")
INIT_MODES = ("copy", "independent")
DTYPES = ("keep", "float32", "bfloat16", "float16")


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
        p.add_argument("--modalities", type=int, required=modalities_required, default=3)
        p.add_argument("--policy", default="auto", choices=POLICIES, help="which parameters to route (default auto)")
        p.add_argument("--include", type=_regex, help="regex: also route parameters whose FQN matches")
        p.add_argument("--exclude", type=_regex, help="regex: keep parameters whose FQN matches shared")
        p.add_argument("--model", help="package.module:factory building the dense module (state-dict checkpoints); "
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
    inspect.add_argument("--graph", metavar="OUT.svg", help="a routed checkpoint: draw its routed graph (networkx)")
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
    add.add_argument("--model", help="package.module:factory building the dense module (non-Hugging Face models)")
    add.add_argument("--overwrite", action="store_true", help="replace an existing output directory")

    verify = commands.add_parser("verify", help="compare a routed checkpoint with its dense one")
    verify.add_argument("dense")
    verify.add_argument("routed")
    verify.add_argument("--model", help="package.module:factory, for state-dict checkpoints")
    return parser


def run(args) -> int:
    if args.command == "inspect":
        from pathlib import Path

        from sparsify.checkpoint import METADATA_FILE, read_metadata
        from sparsify.plan import RoutingPlan

        if (Path(args.path) / METADATA_FILE).exists():
            from sparsify.safetensors_io import read_checkpoint_dir

            metadata = read_metadata(args.path)
            plan = RoutingPlan.from_dict(metadata["plan"])
            versions = ", ".join(f"{k} {v}" for k, v in sorted(metadata.get("versions", {}).items()))
            print(f"{args.path}: routed {metadata['model'].get('class', '?')}, written with {versions}")
            print(plan.summary())
            # The tensors too, headers only: a truncated or half-copied checkpoint is not a routed checkpoint.
            entries = read_checkpoint_dir(Path(args.path))
            for p in plan.params:
                want = [plan.modalities, *p.shape]
                if p.fqn not in entries or list(entries[p.fqn].shape) != want:
                    found = list(entries[p.fqn].shape) if p.fqn in entries else "missing"
                    raise SparsifyError(f"{args.path}: routed parameter {p.fqn!r} should be {want} in the "
                                        f"checkpoint's tensors but is {found}; the checkpoint does not match its "
                                        "sparsify.json (rewrite it with sparsify.save or sparsify convert)")
            print(f"tensors: {len(entries)}, every routed one [{plan.modalities}, ...] as the plan says")
            if args.graph:
                import sparsify
                from sparsify.api import example_call
                from sparsify.convert_checkpoint import load_factory
                from sparsify.graph_svg import draw

                routed = sparsify.load(args.path, model=load_factory(args.model) if args.model else None)
                entry, _ = routed.graph_for(example_call(routed))
                print(f"wrote {draw(entry.routed.graph_module, args.graph)}")
            if args.drift:
                import sparsify
                from sparsify.convert_checkpoint import load_factory, materialize, open_source

                factory = load_factory(args.model) if args.model else None
                routed = sparsify.load(args.path, model=factory)
                reference = materialize(open_source(args.reference), factory)[0] if args.reference else None
                result = sparsify.drift(routed, reference)
                print(result.table())
                print(f"wrote {result.plot(args.drift, title=Path(args.path).name)}")
        elif args.graph or args.drift:
            raise SparsifyError("--graph and --drift draw a routed checkpoint; convert the checkpoint first "
                                "(sparsify convert SRC -o OUT), then inspect OUT --graph out.svg / --drift drift.png")
        else:
            from sparsify.convert_checkpoint import describe_source

            print(describe_source(args.path, args.model, args.modalities, args.policy, args.include, args.exclude))
        return EXIT_OK

    if args.command == "verify":
        from pathlib import Path

        from sparsify.checkpoint import METADATA_FILE

        if (Path(args.dense) / METADATA_FILE).exists() and not (Path(args.routed) / METADATA_FILE).exists():
            raise SparsifyError(f"the arguments are swapped: `sparsify verify DENSE ROUTED`, and {args.dense} is the "
                                f"routed checkpoint (it has {METADATA_FILE}); run: sparsify verify {args.routed} "
                                f"{args.dense}")
        import sparsify
        from sparsify.checkpoint import single_dtype
        from sparsify.convert_checkpoint import load_factory, materialize, open_source

        factory = load_factory(args.model)
        dense, example = materialize(open_source(args.dense), factory)
        routed = sparsify.load(args.routed, model=factory)
        dtype = single_dtype(routed)
        if dtype is not None:  # a checkpoint converted with --dtype: compare with the dense model cast alike
            dense.to(dtype)
        report = sparsify.verify(dense, routed, example_inputs=example)
        print(report)
        return EXIT_OK if report.ok else EXIT_VERIFY_FAILED

    if args.command == "add-modality":
        from sparsify.checkpoint import check_new_path

        check_new_path(args.output, args.overwrite)
        import sparsify
        from sparsify.convert_checkpoint import load_factory

        routed = sparsify.load(args.routed, model=load_factory(args.model) if args.model else None)
        before = routed.plan.modalities
        if args.independent:
            sparsify.add_modality(routed, init="independent")
        else:
            sparsify.add_modality(routed, copy_from=args.copy_from)
        sparsify.save(routed, args.output, overwrite=args.overwrite)
        how = "re-initialised" if args.independent else f"copied from modality {args.copy_from}"
        print(f"wrote {args.output}: {before} -> {routed.plan.modalities} modalities, modality {before} {how}")
        return EXIT_OK

    from sparsify.checkpoint import check_new_path
    from sparsify.convert_checkpoint import convert_checkpoint

    check_new_path(args.output, args.overwrite)  # said before any work, not after the conversion

    bars = []

    def progress(total_bytes):
        from tqdm import tqdm

        bars.append(tqdm(total=total_bytes, unit="B", unit_scale=True, desc="writing", file=sys.stderr))
        return bars[-1].update

    try:
        result = convert_checkpoint(
            args.src, args.output, modalities=args.modalities, policy=args.policy, include=args.include,
            exclude=args.exclude, init=args.init, dtype=args.dtype, verify=not args.no_verify, model=args.model,
            overwrite=args.overwrite, max_shard_bytes=args.max_shard_size, progress=None if args.quiet else progress)
    finally:
        for bar in bars:
            bar.close()
    if not args.quiet:
        print(result["plan"].summary())
        print(result["report"] if result["report"] else "verification skipped (--no-verify)")
        print(f"wrote {args.output}: {', '.join(result['files'])}, sparsify.json")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse printed help (0) or a usage error (2): an exit code, as every error here
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    try:
        return run(args)
    except VerificationError as e:
        print(f"sparsify: verification failed: {e}", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    except InternalError as e:
        print(f"sparsify: internal error: {e}", file=sys.stderr)
        return EXIT_INTERNAL
    except SparsifyError as e:
        print(f"sparsify: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # the command's own steps outside the API's entry points
        print(f"sparsify: internal error: {internal_error(f'sparsify {args.command}', e)}", file=sys.stderr)
        return EXIT_INTERNAL
    except KeyboardInterrupt:
        print("sparsify: interrupted; no output was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
