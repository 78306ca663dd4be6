"""routed.generate: Hugging Face generation with the cache inside the routed graphs (sparsify/generation.py).

Small models with random weights, fp32. At init (copy) every modality's weights are the dense ones, so greedy
generation must equal the dense model's token for token; after perturbing modality 1's copies it must not,
and generating with the cache must still equal generating without it.
"""
import pytest
import torch
import transformers as T

import sparsify
from sparsify import SparsifyError
from tests.test_convert_hybrid_families import bamba, jamba


def llama():
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2))


def mamba():
    return T.MambaForCausalLM(T.MambaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, state_size=8))


MODELS = {"llama": llama, "mamba": mamba, "jamba": jamba}
NEW = 5


def prompt(batch=2, length=6, vocab=96, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :2] = 0  # left padding: the first prompt is 4 tokens long
    return ids, mask


@pytest.fixture(scope="module", params=sorted(MODELS))
def converted(request):
    torch.manual_seed(0)
    dense = MODELS[request.param]().eval()
    return dense, sparsify.convert(dense, modalities=3).eval()


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_equals_dense_at_init(converted, use_cache):
    dense, routed = converted
    ids, mask = prompt()
    expected = dense.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    modality_ids = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 1, 1, 0, 0]])
    out = routed.generate(ids, modality_ids=modality_ids, next_modality=2, attention_mask=mask,
                          max_new_tokens=NEW, do_sample=False, use_cache=use_cache)
    assert out.shape == (2, ids.shape[1] + NEW)
    assert torch.equal(out, expected)


def test_repeated_generation_allocates_its_cache_without_a_dense_forward_where_that_matches(converted, monkeypatch):
    """A generate call allocates the static cache by transformers' eager allocation where every cache layer
    supports it (an attention-only cache: yes) and the first call's dense forward showed that it gives the same
    tensors, else by a dense forward (a Mamba's state cache or a hybrid's attention + state cache). Either way
    generation equals dense, call after call."""
    from sparsify.generation import DecodingStep

    dense, routed = converted
    ids, mask = prompt(seed=3)
    expected = dense.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    dense_forwards = []
    feed_dummy = DecodingStep._feed_dummy
    monkeypatch.setattr(DecodingStep, "_feed_dummy", lambda step, cache: (dense_forwards.append(1),
                                                                            feed_dummy(step, cache)))
    for _ in range(2):
        dense_forwards.clear()  # the second call captures nothing: only the allocation may run a dense forward
        out = routed.generate(ids, modality_ids=torch.ones_like(ids), next_modality=1, attention_mask=mask,
                              max_new_tokens=NEW, do_sample=False)
        assert torch.equal(out, expected)
    family = type(dense).__name__
    assert len(dense_forwards) == (0 if family.startswith("Llama") else 1)


def test_generation_without_attention_mask(converted):
    # No mask: nothing in the graph multiplies by a [batch, seq] tensor; HF Mamba's prefill keeps its tokens
    # through `x[..., -seq_len:]` (a whole-dim slice written from the end).
    dense, routed = converted
    ids, _ = prompt(batch=1, seed=5)
    expected = dense.generate(ids, max_new_tokens=NEW, do_sample=False)
    out = routed.generate(ids, modality_ids=torch.ones_like(ids), next_modality=1, max_new_tokens=NEW,
                          do_sample=False)
    assert torch.equal(out, expected)


def _perturbed(routed, modality, seed=2):
    """Move modality `modality`'s copy of every routed weight away from the dense weight (in place)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for fqn in routed.plan.routed:
            copy = routed.get_parameter(fqn)[modality]
            copy.add_(torch.randn(copy.shape, generator=generator) * copy.std().clamp_min(0.02) * 2)


def test_perturbed_modality_changes_generation_and_cache_equals_no_cache(converted):
    dense, routed = converted
    ids, mask = prompt(seed=1)
    modality_ids = torch.zeros_like(ids)
    baseline = routed.generate(ids, modality_ids=modality_ids, next_modality=1, attention_mask=mask,
                               max_new_tokens=NEW, do_sample=False)
    saved = {fqn: routed.get_parameter(fqn).detach().clone() for fqn in routed.plan.routed}
    try:
        _perturbed(routed, 1)
        with_cache = routed.generate(ids, modality_ids=modality_ids, next_modality=1, attention_mask=mask,
                                     max_new_tokens=NEW, do_sample=False)
        without = routed.generate(ids, modality_ids=modality_ids, next_modality=1, attention_mask=mask,
                                  max_new_tokens=NEW, do_sample=False, use_cache=False)
        modality0 = routed.generate(ids, modality_ids=modality_ids, next_modality=0, attention_mask=mask,
                                    max_new_tokens=NEW, do_sample=False)
    finally:
        with torch.no_grad():
            for fqn, value in saved.items():
                routed.get_parameter(fqn).copy_(value)
    assert not torch.equal(with_cache, baseline)
    assert torch.equal(with_cache, without)
    assert torch.equal(modality0, baseline)  # modality 0's copies were left alone


def test_the_step_graphs_take_the_2d_mask_at_the_cache_length_and_build_the_4d_one(monkeypatch):
    """With a static cache transformers would build the 4-D attention mask in Python before every step; the
    step graphs get the 2-D padding mask instead and build the 4-D mask themselves: each decode step's
    zero-padded to the cache's length (one shape for every step), and with an attention-only cache the
    prefill's too, as transformers pads it for attention (BLOOM builds ALiBi from the raw mask: it must see the
    keys' length); with a recurrent layer the prefill's is left as the user gave it (it takes the mask's last
    prompt-length columns: test_hybrid_prefill_with_left_padding...). Greedy generation with left padding still
    equals dense."""
    from sparsify.generation import DecodingStep

    torch.manual_seed(0)
    dense = llama().eval()
    routed = sparsify.convert(dense, modalities=3).eval()
    ids, mask = prompt(seed=4)
    masks = []
    run = DecodingStep.run
    monkeypatch.setattr(DecodingStep, "run", lambda step, inputs, modality_ids: (
        masks.append(inputs["attention_mask"].clone()), run(step, inputs, modality_ids))[1])
    out = routed.generate(ids, modality_ids=torch.zeros_like(ids), attention_mask=mask, max_new_tokens=NEW,
                          do_sample=False)
    assert torch.equal(out, dense.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False))
    # the cache holds every position fed back: the prompt and all new tokens but the last
    assert len(masks) == NEW and all(m.shape == (2, ids.shape[1] + NEW - 1) for m in masks)
    assert torch.equal(masks[0][:, :ids.shape[1]], mask) and masks[0][:, ids.shape[1]:].eq(0).all()  # the user's
    for step, m in enumerate(masks[1:], 1):  # the mask so far, then zeros for the positions not generated yet
        seen = ids.shape[1] + step
        assert torch.equal(m[:, :ids.shape[1]], mask) and m[:, ids.shape[1]:seen].eq(1).all()
        assert m[:, seen:].eq(0).all()


def falcon_h1():
    return T.FalconH1ForCausalLM(T.FalconH1Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=8,
        mamba_chunk_size=4))


@pytest.mark.parametrize("family", ["bamba", "falcon_h1"])
def test_hybrid_prefill_with_left_padding_equals_dense(family):
    """Mamba2 layers (Bamba; Falcon-H1: attention and Mamba2 side by side in each layer) mask padding with
    the 2-D mask's last prompt-length columns: a prefill mask zero-padded at the end to the cache's length
    masked the prompt itself (wrong tokens from the first new one). Falcon-H1's decode step views the one
    token's [B, 1, H * D] as heads [B, H, D], which token provenance once took for the sequence cut into
    chunks (unroutable). Greedy generation with the cache and a left-padded batch equals dense (without the
    cache each new length is a new capture for a chunked scan: slow, and the forward is tested elsewhere)."""
    torch.manual_seed(0)
    dense = {"bamba": bamba, "falcon_h1": falcon_h1}[family]().eval()
    routed = sparsify.convert(dense, modalities=2).eval()
    ids, mask = prompt(seed=0)
    expected = dense.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    out = routed.generate(ids, modality_ids=torch.zeros_like(ids), attention_mask=mask, max_new_tokens=NEW,
                          do_sample=False)
    assert torch.equal(out, expected)


def step_graphs(routed):
    """{phase: number of graphs} of the decoding-step graphs the routed model holds."""
    counts = {}
    for key, entries in routed._graphs.items():
        if key[-1] is not None:
            counts[key[-1][0]] = counts.get(key[-1][0], 0) + len(entries)
    return counts


SLIDING = {  # a window of 4 tokens, far shorter than prompt + new tokens
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4)),
    "gemma3": lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"])),
}


@pytest.mark.parametrize("family", sorted(SLIDING))
def test_sliding_window_attention_generates_as_dense_past_the_window(family):
    """A static cache's sliding-window layer branches on a Python counter (window full or not) that a
    captured step graph cannot follow: past the window the graph wrote out of bounds. The step graphs hold
    those layers at full length and the model's sliding mask hides the keys outside the window: greedy and
    beam search with left padding equal dense (every layer sliding: Mistral; sliding and full: Gemma 3)."""
    torch.manual_seed(0)
    dense = SLIDING[family]().eval()
    routed = sparsify.convert(dense, modalities=2).eval()
    ids, mask = prompt(seed=9)
    for options in (dict(do_sample=False), dict(num_beams=2)):
        expected = dense.generate(ids, attention_mask=mask, max_new_tokens=NEW, **options)
        out = routed.generate(ids, modality_ids=torch.zeros_like(ids), attention_mask=mask, max_new_tokens=NEW,
                              **options)
        assert torch.equal(out, expected), options
    assert step_graphs(routed) == {"prefill": 2, "decode": 2}  # one of each per batch size (2, and 2 x 2 beams)


# Mamba: the prefill's scan returns its final state (sparsify::selective_scan_with_state), one op for any length.
# Bamba (Mamba2 layers, chunk size 4): its prefill's chunked scan takes the cache's state and returns the new one
# (sparsify::ssd_scan_with_state): one op for any length, where transformers' chunked code, traced, was a graph
# per padding class (lengths 5, 7, 9 pad to 8, 8, 12).
@pytest.mark.parametrize("family,padded", [("llama", False), ("llama", True), ("mamba", False), ("bamba", False),
                                           ("bamba", True)])
def test_one_prefill_and_one_decode_graph_per_cache_shape(family, padded):
    torch.manual_seed(0)
    dense = {**MODELS, "bamba": bamba}[family]().eval()
    routed = sparsify.convert(dense, modalities=2).eval()
    for length in (5, 7, 9):  # prompt lengths differ; batch and cache length (max_length) stay
        # no pad token (id 0 in Mamba and Bamba): generate would then make a padding mask, a graph input more
        ids = torch.randint(1, 96, (2, length))
        # With a padding mask, the 2-D mask the graphs take grows by one column per step.
        mask = {"attention_mask": (torch.arange(length) >= torch.tensor([[0], [2]])).long()} if padded else {}
        options = dict(max_length=16, min_length=16, do_sample=False, **mask)
        out = routed.generate(ids, modality_ids=torch.zeros_like(ids), **options)
        assert torch.equal(out, dense.generate(ids, **options)), length
    assert step_graphs(routed) == {"prefill": 1, "decode": 1}


def test_next_modality_mapping_equals_the_callable_it_describes():
    torch.manual_seed(0)
    dense = llama().eval()
    routed = sparsify.convert(dense, modalities=3).eval()
    with torch.no_grad():
        for fqn in routed.plan.routed:
            routed.get_parameter(fqn)[2].mul_(1.5)
    ids, mask = prompt(seed=3)
    seen = []

    def rule(new, so_far):
        seen.append(so_far.shape)
        return torch.where((new >= 32) & (new < 64), 2, 0)

    options = dict(modality_ids=torch.zeros_like(ids), attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    by_callable = routed.generate(ids, next_modality=rule, **options)
    by_mapping = routed.generate(ids, next_modality={range(32, 64): 2}, **options)
    assert torch.equal(by_callable, by_mapping)
    # Called once per new token fed back, with the ids so far including it.
    assert seen == [(2, ids.shape[1] + k) for k in range(1, NEW)]


def test_sampling_with_several_sequences_per_prompt():
    torch.manual_seed(0)
    routed = sparsify.convert(llama().eval(), modalities=2).eval()
    ids, mask = prompt()
    torch.manual_seed(4)
    out = routed.generate(ids, modality_ids=torch.ones_like(ids), attention_mask=mask, max_new_tokens=NEW,
                          do_sample=True, top_k=20, temperature=0.8, num_return_sequences=3)
    assert out.shape == (6, ids.shape[1] + NEW)
    assert torch.equal(out[:, :ids.shape[1]], ids.repeat_interleave(3, 0))


@pytest.mark.parametrize("use_cache", [True, False])
def test_beam_search_equals_dense_at_init(converted, use_cache):
    dense, routed = converted
    ids, mask = prompt(seed=6)
    options = dict(attention_mask=mask, max_new_tokens=NEW, num_beams=3, num_return_sequences=2, use_cache=use_cache)
    expected = dense.generate(ids, **options)
    out = routed.generate(ids, modality_ids=torch.zeros_like(ids), next_modality={range(48, 96): 1}, **options)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("family", ["llama", "mamba"])
def test_beam_search_scores_each_beam_with_its_own_tokens_modalities(family):
    """Beam search reorders the sequences between steps (a row goes on with another row's beam): the cache
    buffers and the modality history must follow. Modality 1 perturbed; a new token's modality depends on its
    row's whole history (the parity of the count of ids >= 48 so far), so beams differ in modality and a row
    given another row's history gets wrong ids. Every returned beam's score must equal what one plain forward
    of the routed model on the whole sequence gives it, with the modality ids the rule assigns to its tokens
    (length_penalty 0: the score is the sum of the new tokens' log-probabilities). fp32; observed <= 2e-6."""
    torch.manual_seed(0)
    routed = sparsify.convert(MODELS[family]().eval(), modalities=2).eval()
    _perturbed(routed, 1)
    ids, mask = prompt(seed=7)
    modality_ids = torch.tensor([[0, 0, 1, 1, 0, 1], [1, 0, 1, 0, 1, 0]])

    def rule(new, so_far):
        return (so_far >= 48).sum(1) % 2

    scores = {}
    for use_cache in (True, False):
        out = routed.generate(ids, modality_ids=modality_ids, next_modality=rule, attention_mask=mask,
                              max_new_tokens=NEW, num_beams=4, num_return_sequences=4, length_penalty=0.0,
                              return_dict_in_generate=True, output_scores=True, use_cache=use_cache)
        scores[use_cache] = out.sequences_scores
        sequences = out.sequences
        if use_cache:
            assert "reorder_cache" not in vars(out.past_key_values)  # the hook was for that call only
    prompt_len = ids.shape[1]
    new_ids = (sequences >= 48).cumsum(1)[:, prompt_len:] % 2
    full_ids = torch.cat([modality_ids.repeat_interleave(4, 0), new_ids], 1)
    full_mask = torch.cat([mask.repeat_interleave(4, 0), torch.ones_like(new_ids)], 1)
    with torch.no_grad():
        logits = routed(sequences, modality_ids=full_ids, attention_mask=full_mask).logits
    log_probs = logits[:, prompt_len - 1:-1].float().log_softmax(-1)
    expected = log_probs.gather(-1, sequences[:, prompt_len:, None]).squeeze(-1).sum(-1)
    assert len(set(map(tuple, new_ids.tolist()))) > 1  # the beams do differ in modality
    for use_cache, got in scores.items():
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=f"use_cache={use_cache}")


@pytest.mark.parametrize("use_cache", [True, False])
def test_hidden_states_attentions_and_scores_generate_returns_equal_dense(use_cache):
    """return_dict_in_generate with output_hidden_states / output_attentions / output_logits: the step graphs
    return what generate reads back; attention weights over the static cache are cut to the keys so far, as
    the dense model's growing cache gives them (fp32, at init; tolerance 1e-5, observed: bitwise equal). No
    left padding here: at a padded position every key is masked, and what attention makes of that depends on how
    many keys there are (the static cache's length), in the dense model with a static cache alike."""
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    dense = T.LlamaForCausalLM(config).eval()
    routed = sparsify.convert(dense, modalities=2).eval()
    ids, _ = prompt(seed=8)
    options = dict(attention_mask=torch.ones_like(ids), max_new_tokens=3, return_dict_in_generate=True,
                   output_hidden_states=True, output_attentions=True, output_logits=True, use_cache=use_cache)
    expected = dense.generate(ids, **options)
    out = routed.generate(ids, modality_ids=torch.ones_like(ids), next_modality=1, **options)
    assert torch.equal(out.sequences, expected.sequences)
    for field in ("hidden_states", "attentions", "logits"):
        got, want = torch.utils._pytree.tree_leaves(out[field]), torch.utils._pytree.tree_leaves(expected[field])
        assert [t.shape for t in got] == [t.shape for t in want], field
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{field} {a.shape} {m}")


def test_beam_search_refuses_a_cache_reorder_it_cannot_follow(monkeypatch):
    torch.manual_seed(0)
    routed = sparsify.convert(llama().eval(), modalities=2).eval()
    ids, mask = prompt()
    options = dict(modality_ids=torch.zeros_like(ids), attention_mask=mask, max_new_tokens=3, num_beams=2)
    own_reorder = T.StaticCache.reorder_cache

    def shrinking(cache, beam_idx):  # a reorder that rebinds a tensor of another shape
        own_reorder(cache, beam_idx)
        cache.layers[0].keys = cache.layers[0].keys[:, :, :-1]
    monkeypatch.setattr(T.StaticCache, "reorder_cache", shrinking)
    with pytest.raises(SparsifyError, match="layer0_keys changed from"):
        routed.generate(ids, **options)
    monkeypatch.undo()
    monkeypatch.setattr(routed._dense, "_reorder_cache", lambda past, beam_idx: past, raising=False)
    with pytest.raises(SparsifyError, match="its own _reorder_cache"):
        routed.generate(ids, **options)
    assert routed.generate(ids, **options, use_cache=False).shape == (2, ids.shape[1] + 3)


@pytest.mark.parametrize("next_modality, message", [
    (lambda new, so_far: torch.full_like(new, 7), r"next_modality gave modality ids in \[7, 7\]"),
    (lambda new, so_far: torch.zeros(3, 3, dtype=torch.long), "shape"),
    (lambda new, so_far: new.float(), "integer modality ids"),
    (5, "not a modality"),
    ({"text": 0}, "token-id ranges"),
])
def test_bad_next_modality_is_a_clear_error(next_modality, message):
    torch.manual_seed(0)
    routed = sparsify.convert(llama().eval(), modalities=2).eval()
    ids, mask = prompt()
    with pytest.raises(SparsifyError, match=message):
        routed.generate(ids, modality_ids=torch.zeros_like(ids), next_modality=next_modality, attention_mask=mask,
                        max_new_tokens=3, do_sample=False)


def test_a_cache_from_elsewhere_is_refused():
    torch.manual_seed(0)
    other = llama().eval()
    routed = sparsify.convert(llama().eval(), modalities=2).eval()
    ids, _ = prompt()
    foreign = T.DynamicCache(config=other.config)
    other(ids, past_key_values=foreign, use_cache=True)
    with pytest.raises(SparsifyError, match="cannot be used"):
        routed.generate(ids, modality_ids=torch.zeros_like(ids), past_key_values=foreign, max_new_tokens=2)
    with pytest.raises(SparsifyError, match="routed.generate"):
        routed(ids, modality_ids=torch.zeros_like(ids), past_key_values=foreign, use_cache=True)
    with pytest.raises(SparsifyError, match="routed.generate"):
        routed(ids, modality_ids=torch.zeros_like(ids), use_cache=True)
    with pytest.raises(SparsifyError, match="modality_ids for the prompt"):
        routed.generate(ids, max_new_tokens=2)
    with pytest.raises(SparsifyError, match="assisted generation"):
        routed.generate(ids, modality_ids=torch.zeros_like(ids), prompt_lookup_num_tokens=2, max_new_tokens=2)

