"""routed.generate on Hugging Face families whose cached decoding step needed more than Llama's, and the
fallback to uncached generation where the step cannot be routed. fp32, tokens compared exactly."""
import pytest
import torch

import sparsify
from tests.test_generation import NEW, llama, prompt

# Families whose cached step needed more than Llama's: Falcon's multi-query attention keeps one key head where the
# config's head counts say more (transformers' eager cache allocation would size it wrong); RoFormer and BERT as a
# decoder take no position ids and read the tokens so far from the cache (a data-dependent count in a static
# cache) unless given a mask; OpenAI GPT takes no cache argument at all; Doge's decode reads a routed projection
# of the cache's contents (earlier tokens, whose modalities the step does not hold): generated without a cache.
# MiniMax keeps a cache class of its own (generate passes no static cache): generated without a cache. BLOOM builds
# ALiBi from the raw 2-D mask, so the prefill's mask must span the cache's length.
FAMILY_CASES = {"bloom": "cached", "falcon": "cached", "roformer": "cached", "bert": "cached", "openai-gpt": "uncached",
                "doge": "fallback", "minimax": "fallback"}
FALLBACK_REASON = {"doge": "dt_proj", "minimax": "does not take transformers' static cache"}


@pytest.mark.parametrize("family", sorted(FAMILY_CASES))
def test_families_generate_as_dense(family, recwarn, monkeypatch):
    from sparsify.generation import DecodingStep
    from tests.hf_tiny import tiny_causal_lm

    steps = []  # step graphs run to the end
    run = DecodingStep.run

    def counted_run(step, *args):
        out = run(step, *args)
        steps.append(1)
        return out
    monkeypatch.setattr(DecodingStep, "run", counted_run)
    dense = tiny_causal_lm(family)
    routed = sparsify.convert(dense, modalities=3)
    ids, _ = prompt(batch=2, length=5, vocab=100, seed=4)
    expected = dense.generate(ids, max_new_tokens=4, do_sample=False)
    for _ in range(2):  # the second call reuses the first's graphs, allocation verdict or fallback
        out = routed.generate(ids, modality_ids=torch.zeros_like(ids), max_new_tokens=4, do_sample=False)
        assert torch.equal(out, expected)
    fallback = [str(w.message) for w in recwarn if "generating without one" in str(w.message)]
    if FAMILY_CASES[family] == "fallback":
        assert fallback and FALLBACK_REASON[family] in fallback[0], fallback  # says why
        # the failed cached attempt draws no random numbers the user's sampling would miss
        torch.manual_seed(7)
        sampled = dense.generate(ids, max_new_tokens=4, do_sample=True)
        torch.manual_seed(7)
        assert torch.equal(routed.generate(ids, modality_ids=torch.zeros_like(ids), max_new_tokens=4,
                                           do_sample=True), sampled)
    else:
        assert not fallback
    assert bool(steps) == (FAMILY_CASES[family] == "cached")  # the routed step graphs ran the cached calls


def test_a_model_transformers_cannot_build_a_static_cache_for_generates_uncached(monkeypatch):
    """transformers' StaticCache refuses some layer kinds (DeepSeek-V4's compressed attention): generate says so
    and generates without a cache, equal to dense."""
    torch.manual_seed(0)
    dense = llama().eval()
    routed = sparsify.convert(dense, modalities=3)
    ids, mask = prompt()
    expected = dense.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)

    def refuse(*args, **kwargs):
        raise KeyError("heavily_compressed_attention")
    monkeypatch.setattr(routed._dense, "_prepare_static_cache", refuse)  # convert copied the dense model
    with pytest.warns(UserWarning, match="transformers cannot build a static cache for it: KeyError"):
        out = routed.generate(ids, modality_ids=torch.zeros_like(ids), attention_mask=mask, max_new_tokens=NEW,
                              do_sample=False)
    assert torch.equal(out, expected)
