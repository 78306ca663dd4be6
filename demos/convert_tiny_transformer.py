"""Convert a small Llama into a 3-modality Mixture-of-Transformers and a small Mamba into a Mixture-of-Mamba,
and show what a user came for: what was routed, parameters before and after, equal to the dense model (with
the measured error), a routed forward at a new shape, a training step that moves only the right copies, a
generate, and a save / reload. Runs on CPU in seconds from configs (random weights).

    python demos/convert_tiny_transformer.py [--verbose]    # --verbose: the routing plan, parameter by parameter
"""
import argparse
import tempfile
import warnings

import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM

import sparsify

MODALITIES = ("text", "image", "speech")


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def show(name: str, dense, verbose: bool) -> None:
    print(f"\n== {name} ==")
    routed = sparsify.convert(dense, modalities=len(MODALITIES))  # dense is not modified
    plan = routed.plan
    print(f"converted {type(dense).__name__}: {len(plan.params)} of {len(plan.params) + len(plan.shared)} parameter "
          f"tensors routed over {len(MODALITIES)} modalities ({', '.join(MODALITIES)}), policy {plan.policy}")
    print(f"parameters: dense {count(dense):,} -> routed {count(routed):,} ({count(routed) / count(dense):.2f}x); "
          "each token still uses the dense count")
    report = routed.verify_report
    print(f"verified equal to dense at init: {'OK' if report.ok else 'FAILED'}, max relative error "
          f"{report.max_rel_err:.1e} (fp32, tolerance 1e-5)")
    if verbose:
        print(plan.summary())

    tokens = torch.randint(0, 1000, (3, 40))  # a batch and length convert never saw, modalities interleaved
    ids = torch.randint(0, len(MODALITIES), (3, 40))
    with torch.no_grad():
        want = dense(tokens, use_cache=False).logits
        got = routed(tokens, modality_ids=ids).logits
    print(f"routed forward, batch 3 x 40 tokens of mixed modalities: max relative error vs dense "
          f"{float((got - want).abs().max() / want.abs().max()):.1e}")

    routed.train()
    text_and_image = torch.randint(0, 2, (3, 40))  # no speech token
    loss = F.cross_entropy(routed(tokens, modality_ids=text_and_image).logits[:, :-1].flatten(0, 1),
                           tokens[:, 1:].flatten())
    loss.backward()
    speech_grad = max(float(routed.get_parameter(f).grad[2].abs().max()) for f in plan.routed)
    torch.optim.AdamW(routed.parameters(), lr=1e-3).step()
    print(f"training step on text and image tokens: loss {loss.item():.3f}; largest gradient on a speech copy "
          f"{speech_grad} (routing is real)")

    routed.eval()
    prompt, prompt_ids = tokens[:1, :8], ids[:1, :8]
    generated = routed.generate(prompt, modality_ids=prompt_ids, next_modality=0, max_new_tokens=6, do_sample=False)
    print(f"generate, 6 new text tokens after an 8-token prompt: {generated[0, 8:].tolist()}")

    with tempfile.TemporaryDirectory() as tmp:
        path = sparsify.save(routed, f"{tmp}/routed")
        loaded = sparsify.load(path)
        with torch.no_grad():
            same = torch.equal(loaded(tokens, modality_ids=ids).logits, routed(tokens, modality_ids=ids).logits)
        files = ", ".join(sorted(p.name for p in path.iterdir()))
        print(f"saved ({files}) and reloaded: outputs identical {same}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--verbose", action="store_true", help="print each routing plan in full")
    args = parser.parse_args(argv)
    # transformers 5.23 and torch 2.13 warn about each other's deprecated names (pytree's LeafSpec): not the
    # user's concern in a demo, and nothing sparsify can change.
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.logging.set_verbosity_error()  # "install causal_conv1d for the fast kernel": a CPU demo knows
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, hidden_size=128, intermediate_size=344,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                                         max_position_embeddings=256)).eval()
    show("Llama (4 layers, hidden 128) -> Mixture-of-Transformers", llama, args.verbose)
    mamba = MambaForCausalLM(MambaConfig(num_hidden_layers=2, hidden_size=64, state_size=8, vocab_size=1000,
                                         intermediate_size=128)).eval()
    show("Mamba (2 layers, hidden 64) -> Mixture-of-Mamba", mamba, args.verbose)


if __name__ == "__main__":
    main()
