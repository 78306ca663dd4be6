"""Convert a small Llama-style transformer into a 3-modality Mixture-of-Transformers and check it,
then a small Mamba into a Mixture-of-Mamba.

Runs on CPU in seconds: builds the model from a config (random weights), converts it,
prints the routing table and the measured error against the dense model, then
shows that routing is real and that the routed model trains and round-trips to disk.
"""
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sparsify


def main():
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=4, hidden_size=128, intermediate_size=344, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256)
    dense = LlamaForCausalLM(config).eval()

    routed = sparsify.convert(dense, modalities=3)  # text, image, speech
    print(routed.plan.summary())
    print()
    print(routed.verify_report)

    # A batch and sequence length other than the capture's, interleaved modalities.
    input_ids = torch.randint(0, 1000, (3, 40))
    modality_ids = torch.randint(0, 3, (3, 40))
    with torch.no_grad():
        dense_logits = dense(input_ids, use_cache=False).logits
        routed_logits = routed(input_ids, modality_ids=modality_ids).logits
    err = (routed_logits - dense_logits).abs().max() / dense_logits.abs().max()
    print(f"batch 3 x seq 40, fp32: max relative error vs dense = {err:.2e} (tolerance 1e-5)")

    # One optimizer step moves each modality's copy only by its own tokens.
    routed.train()
    optimizer = torch.optim.AdamW(routed.parameters(), lr=1e-3)
    text_and_image = torch.randint(0, 2, (3, 40))
    loss = torch.nn.functional.cross_entropy(
        routed(input_ids, modality_ids=text_and_image).logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
    loss.backward()
    speech_grad = max(float(routed.get_parameter(f).grad[2].abs().max()) for f in routed.plan.routed)
    optimizer.step()
    print(f"train step on text+image tokens: loss {loss.item():.3f}, largest gradient on a speech copy {speech_grad}")

    with tempfile.TemporaryDirectory() as tmp:
        path = sparsify.save(routed.eval(), f"{tmp}/routed")
        loaded = sparsify.load(path)
        with torch.no_grad():
            same = torch.equal(loaded(input_ids, modality_ids=modality_ids).logits,
                               routed(input_ids, modality_ids=modality_ids).logits)
        print(f"saved to {path.name}/ ({', '.join(sorted(p.name for p in path.iterdir()))}); reload identical: {same}")

    # Mixture-of-Mamba: the same call; blocks without attention get the MoM preset.
    from transformers import MambaConfig, MambaForCausalLM

    mamba = MambaForCausalLM(MambaConfig(num_hidden_layers=2, hidden_size=64, state_size=8, vocab_size=1000,
                                         intermediate_size=128)).eval()
    routed_mamba = sparsify.convert(mamba, modalities=3)
    print()
    print(routed_mamba.plan.summary())
    print(routed_mamba.verify_report)


if __name__ == "__main__":
    main()
