"""Modality ids from a vision-language model's own placeholder and marker token ids (Gemma 3's config, tiny)."""
import warnings

import pytest
import torch

import sparsify
from sparsify import SparsifyError
from tests.hf_tiny import tiny_causal_lm

BOI, EOI, IMAGE = 5, 6, 7  # Gemma 3's begin-of-image marker, end marker and image placeholder, inside the tiny vocab


@pytest.fixture(scope="module")
def gemma3():
    dense = tiny_causal_lm("gemma3", boi_token_index=BOI, eoi_token_index=EOI, image_token_index=IMAGE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dense, sparsify.convert(dense, modalities=3)


def test_placeholder_and_marker_tokens_get_the_image_modality(gemma3):
    dense, routed = gemma3
    tokens = torch.tensor([[9, BOI, IMAGE, IMAGE, EOI, 11], [BOI, 12, 13, 14, 15, EOI]])
    want = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 1]])
    assert torch.equal(sparsify.modality_ids_from_tokens(dense, tokens), want)
    assert torch.equal(sparsify.modality_ids_from_tokens(routed, tokens), want)  # the routed model reads the same
    assert torch.equal(sparsify.modality_ids_from_tokens(dense, tokens, {"image": 2, "text": 1}), want + 1)
    assert sparsify.token_modalities(dense) == {range(BOI, BOI + 1): 1, range(EOI, EOI + 1): 1,
                                                range(IMAGE, IMAGE + 1): 1, "default": 0}


def test_routed_by_those_ids_equals_dense_and_routes_the_marked_tokens(gemma3):
    dense, routed = gemma3
    # text with image markers (the placeholder itself needs pixel values; the markers are ordinary embeddings)
    tokens = torch.tensor([[20, 21, 22, BOI, 23, 24, EOI, 25], [30, 31, 32, 33, 34, 35, 36, 37]])
    ids = sparsify.modality_ids_from_tokens(routed, tokens)
    with torch.no_grad():
        want = dense(tokens, use_cache=False).logits
        got = routed(tokens, modality_ids=ids).logits
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5
        saved = {fqn: routed.get_parameter(fqn)[1].clone() for fqn in routed.plan.routed}
        try:
            for fqn in routed.plan.routed:
                routed.get_parameter(fqn)[1].mul_(1.5)
            moved = (routed(tokens, modality_ids=ids).logits - got).abs().amax(-1)
        finally:
            for fqn, value in saved.items():
                routed.get_parameter(fqn)[1].copy_(value)
    assert float(moved[:, :3].max()) == 0 and float(moved[1].max()) == 0  # before any image token: unchanged
    assert bool((moved[0, 3:] > 1e-4).all())  # the marked tokens, and what attends to them


def test_generate_follows_the_markers_it_produces(gemma3):
    dense, routed = gemma3
    prompt = torch.tensor([[20, 21, BOI, 22], [30, 31, 32, 33]])
    expected = dense.generate(prompt, max_new_tokens=4, do_sample=False)
    out = routed.generate(prompt, modality_ids=sparsify.modality_ids_from_tokens(routed, prompt),
                          next_modality=sparsify.token_modalities(routed), max_new_tokens=4, do_sample=False)
    assert torch.equal(out, expected)


def test_bad_uses_are_clear_errors(gemma3):
    dense, routed = gemma3
    with pytest.raises(SparsifyError, match="names no image, video or audio placeholder"):
        sparsify.token_modalities(tiny_causal_lm("llama"))
    with pytest.raises(SparsifyError, match=r"modalities\['image'\]=3 is not a modality id of this model"):
        sparsify.token_modalities(routed, {"image": 3})
    with pytest.raises(SparsifyError, match="the kinds are"):
        sparsify.token_modalities(routed, {"pictures": 1})
    with pytest.raises(SparsifyError, match="integer tensor of token ids"):
        sparsify.modality_ids_from_tokens(routed, torch.zeros(2, 3))
