"""The `sparsify` command's work: convert, inspect, verify and add-modality on checkpoints on disk.

Arguments are parsed by the top-level `sparsify_cli` module, which imports this one (and so torch) only once
they are known to be good; exit codes are there.
"""
from __future__ import annotations

import sys

from sparsify.errors import InternalError, SparsifyError, VerificationError, internal_error
from sparsify_cli import (DTYPES, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_OK, EXIT_VERIFY_FAILED, INIT_MODES,
                          POLICIES, main)

__all__ = ["DTYPES", "EXIT_BAD_INPUT", "EXIT_INTERNAL", "EXIT_OK", "EXIT_VERIFY_FAILED", "INIT_MODES", "POLICIES",
           "execute", "main", "run"]


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
                print(f"wrote {draw(entry.routed, args.graph)}")
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


def execute(args) -> int:
    """run(args), every failure an exit code and one line on stderr."""
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
