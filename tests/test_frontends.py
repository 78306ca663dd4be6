"""The Frontend protocol: the Hugging Face, token-ids and mamba_ssm frontends are its instances, and the
first that matches a model serves it."""
from sparsify import frontends
from sparsify.frontends.base import Frontend
from tests.conftest import tiny_llama
from tests.toy_models import SeqFirst, ToyLM


def test_the_three_frontends_are_instances_of_one_protocol():
    assert [f.name for f in frontends.FRONTENDS] == ["huggingface", "token_ids", "mamba_ssm"]
    assert all(isinstance(f, Frontend) for f in frontends.FRONTENDS)
    assert set(frontends.CACHE_ARGS) == {"past_key_values", "cache_params"}


def test_the_first_matching_frontend_serves_a_model():
    llama, toy = tiny_llama(), ToyLM()
    assert frontends.for_model(llama).name == "huggingface"  # a vocabulary too, but its own frontend knows more
    assert frontends.for_model(toy).name == "token_ids"
    assert frontends.for_model(SeqFirst()) is None           # no vocabulary: the caller passes example_inputs
    assert frontends.call_defaults(llama) == {"use_cache": False} and frontends.call_defaults(toy) == {}
    inputs = frontends.for_model(toy).example_inputs(toy)
    assert list(inputs) == ["tokens"] and inputs["tokens"].shape == (2, 13)
    description = frontends.for_model(llama).describe(llama)
    rebuilt = frontends.by_name(description["kind"]).rebuild(description)
    assert type(rebuilt) is type(llama) and rebuilt.config.hidden_size == llama.config.hidden_size


def test_graph_forms_of_every_frontend_are_entered_and_left():
    import transformers.models.mamba.modeling_mamba as modeling_mamba  # noqa: F401  (a module with a scan)
    from sparsify.frontends import huggingface

    original = getattr(modeling_mamba, huggingface.SCAN_FUNCTION)
    with frontends.graph_forms():
        inside = getattr(modeling_mamba, huggingface.SCAN_FUNCTION)
    assert inside is not original  # transformers' scan is the sparsify op while capturing
    assert getattr(modeling_mamba, huggingface.SCAN_FUNCTION) is original


def test_use_cache_false_reaches_a_backbone_through_kwargs_where_only_its_language_config_has_it():
    """A speech-text model (MOSS) takes use_cache only through **kwargs, and only its text_config has use_cache:
    capture must still pass use_cache=False (a cache object cannot be exported)."""
    from types import SimpleNamespace

    from sparsify.frontends.huggingface import call_defaults

    class Wrapper:
        config = SimpleNamespace(text_config=SimpleNamespace(use_cache=True))

        def forward(self, input_ids, **kwargs):
            return input_ids

    class NoCache(Wrapper):
        config = SimpleNamespace(text_config=SimpleNamespace())

    assert call_defaults(Wrapper()) == {"use_cache": False}
    assert call_defaults(NoCache()) == {}
