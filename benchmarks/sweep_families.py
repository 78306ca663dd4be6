"""Every causal-LM family the installed transformers ships, converted from a tiny random config: a table.

Slow (minutes per dozen families; not part of `make test`, which keeps a representative subset). Each
family runs in its own subprocess with a memory and time limit, so one family's crash or hang is a row of
the table, not the end of the sweep. Columns:

- built: the tiny model builds and its dense forward runs on CPU (else the reason: the family, not sparsify)
- converted: `sparsify.convert(model, modalities=3)` with no other argument
- equal: max relative error of the routed logits against dense at a shape other than the capture's (fp32)
- routed: the fraction of the block linear and norm parameters (by module class, this script's own view) that
  the default policy routes, of those the forward uses (an encoder-decoder family's cross-attention has no
  encoder states in a causal LM: unused); mot: the same under policy="mot"
- real: modality 1's copies perturbed (seeded noise): a row of modality 0 alone is unchanged, modality-1 tokens
  change
- generate: greedy `routed.generate` equals `dense.generate` (4 new tokens, one modality): "yes" with the cache
  in the routed step graphs, "yes, uncached" where sparsify fell back to generating without one (it warns
  why); where the dense model's own generate fails at this tiny size, or its cached and uncached generate
  disagree (then routed is compared with the uncached), that is said

    python benchmarks/sweep_families.py [--types llama gpt2 ...] [--markdown docs/families.md]
    python benchmarks/sweep_families.py --rows-from a.log b.log --markdown docs/families.md   # runs split up
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/hf_tiny.py builds the tiny configs, for the tests and for this
MEMORY_LIMIT = 12 * 2**30  # address space (RLIMIT_AS), not resident memory: torch reserves more than it touches
TIME_LIMIT = 300


def _short(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:160]}"


def one_family(model_type: str) -> dict:
    import torch

    import sparsify
    from tests.hf_tiny import tiny_causal_lm

    row = {"type": model_type}
    try:
        dense = tiny_causal_lm(model_type)
        vocab = dense.get_output_embeddings().weight.shape[0] if dense.get_output_embeddings() is not None else 32
        x = torch.randint(3, min(vocab, 100), (3, 11), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want = dense(x, use_cache=False).logits
    except Exception as e:  # the family itself: a tiny config it refuses, or a forward that fails on CPU
        row["built"] = _short(e)
        return row
    row["built"] = "yes"
    try:
        routed = sparsify.convert(dense, modalities=3)
    except Exception as e:
        row["converted"] = _short(e)
        return row
    row["converted"] = "yes"
    ids = torch.randint(0, 3, tuple(x.shape), generator=torch.Generator().manual_seed(2))
    ids[0] = 0
    try:
        with torch.no_grad():
            got = routed(x, modality_ids=ids).logits
        row["equal"] = float((got - want).abs().max() / want.abs().max())
    except Exception as e:
        row["equal"] = _short(e)
        return row
    block = {f"{name}.{p}" for name, module in dense.named_modules() if any(c.isdigit() for c in name.split("."))
             if type(module).__name__.endswith(("Linear", "Norm", "RMSNorm", "LayerNorm", "Conv1D"))
             for p, _ in module.named_parameters(recurse=False)}
    block -= {p.fqn for p in routed.plan.shared if p.role == "unused"}
    row["routed"] = len(block & set(routed.plan.routed)) / max(len(block), 1)
    try:
        mot = sparsify.convert(dense, modalities=3, policy="mot", verify=False)
        row["mot"] = len(block & set(mot.plan.routed)) / max(len(block), 1)
        del mot
    except Exception as e:
        row["mot"] = _short(e)
    try:
        # Random noise, not a constant: a constant added to a whole weight shifts every feature alike, which a
        # LayerNorm without parameters (OLMo's) takes out again.
        noise = torch.Generator().manual_seed(3)
        saved = {fqn: routed.get_parameter(fqn)[1].clone() for fqn in routed.plan.routed}
        with torch.no_grad():
            for fqn in routed.plan.routed:
                copy = routed.get_parameter(fqn)[1]
                scale = max(float(copy.std()) if copy.numel() > 1 else 0.0, 0.1)  # a norm's ones: std 0
                copy.add_(torch.randn(copy.shape, generator=noise) * scale * 0.5)
            moved = (routed(x, modality_ids=ids).logits - got).abs().amax(-1)
        # A row of modality 0 alone may move by rounding where the model couples a batch's rows (a
        # mixture-of-experts layer that groups tokens across rows): 1e-5 of the logits' scale is the bound.
        scale = float(got.abs().max())
        row["real"] = "yes" if float(moved[0].max()) <= 1e-5 * scale and bool((moved[ids == 1] > 1e-5 * scale).all()) \
            else f"no (row of modality 0 moved {float(moved[0].max()):.1e}, scale {scale:.1e})"
        with torch.no_grad():
            for fqn, value in saved.items():
                routed.get_parameter(fqn)[1].copy_(value)
    except Exception as e:
        row["real"] = _short(e)
    prompt = x[:2, :5]
    try:
        expected = dense.generate(prompt, max_new_tokens=4, do_sample=False)
        uncached = dense.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False)
    except Exception as e:  # the family (or its tiny config) cannot generate
        row["generate"] = f"dense generate fails: {_short(e)}"
        return row
    family_note = ""
    if not torch.equal(expected, uncached):  # the family's own cached decoding is not its forward's
        expected, family_note = uncached, " (the family's own cached generate differs from its uncached: compared with the uncached)"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = routed.generate(prompt, modality_ids=torch.zeros_like(prompt), next_modality=0, max_new_tokens=4,
                                  do_sample=False)
        fallback = any("generating without one" in str(w.message) for w in caught)
        row["generate"] = ("yes, uncached" if fallback else "yes") if torch.equal(out, expected) else "differs"
        row["generate"] += family_note
    except Exception as e:
        row["generate"] = _short(e)
    return row


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_isolated(model_type: str) -> dict:
    start = time.time()
    try:
        done = subprocess.run([sys.executable, __file__, "--one", model_type], capture_output=True, text=True,
                              timeout=TIME_LIMIT, preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired:
        return {"type": model_type, "built": f"timed out after {TIME_LIMIT} s", "seconds": TIME_LIMIT}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    row = json.loads(lines[-1]) if lines else {
        "type": model_type, "built": f"process died (exit {done.returncode}): {done.stderr.strip()[-160:]}"}
    row["seconds"] = round(time.time() - start, 1)
    return row


COLUMNS = ("type", "built", "converted", "equal", "routed", "mot", "real", "generate")


def markdown(rows: list[dict], header: str) -> str:
    def cell(value):
        if isinstance(value, float):
            return f"{value:.1e}" if value < 0.01 or value > 1 else f"{value:.0%}"
        return str(value if value is not None else "").replace("|", "\\|")

    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in COLUMNS) + " |" for row in rows]
    built = [r for r in rows if r.get("built") == "yes"]
    converted = [r for r in built if r.get("converted") == "yes"]
    equal = [r for r in converted if isinstance(r.get("equal"), float) and r["equal"] <= 1e-4]
    generated = [r for r in equal if str(r.get("generate")).startswith("yes")]
    uncached = [r for r in generated if str(r.get("generate")).startswith("yes, uncached")]
    dense_fails = [r for r in equal if str(r.get("generate")).startswith("dense generate fails")]
    real = [r for r in equal if r.get("real") == "yes"]
    most = [r for r in equal if isinstance(r.get("mot"), float) and r["mot"] >= 0.9]
    lines += ["", f"{len(rows)} families: {len(built)} build tiny on CPU, {len(converted)} convert, "
              f"{len(equal)} equal dense (max rel err <= 1e-4, fp32), {len(real)} of those route for real, "
              f"{len(most)} route >= 90% of their used block linears and norms under mot; {len(generated)} "
              f"generate equal ({len(uncached)} of them uncached), {len(dense_fails)} whose dense generate fails."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", nargs="*", help="model types (default: every causal-LM family)")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--rows-from", nargs="*", help="make the table from the JSON lines of earlier runs")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        warnings.simplefilter("ignore")
        print(json.dumps(one_family(args.one)))
        return
    import torch
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    rows = []
    if args.rows_from:
        for path in args.rows_from:
            with open(path) as f:
                rows += [json.loads(line) for line in f if line.startswith("{")]
        rows = sorted({row["type"]: row for row in rows}.values(), key=lambda row: row["type"])
    for model_type in [] if args.rows_from else args.types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        rows.append(run_isolated(model_type))
        print(json.dumps(rows[-1]), flush=True)
    header = (f"Causal-LM families, transformers {transformers.__version__}, torch {torch.__version__}, "
              f"CPU fp32, {time.strftime('%Y-%m-%d')} (benchmarks/sweep_families.py)")
    table = markdown(rows, header)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
