import os

import torch

# Kernel tests run the Triton kernels on CPU through the interpreter when no GPU is present.
# Set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def tiny_gpt2(**overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=101, n_positions=64,
                  bos_token_id=0, eos_token_id=0)
    config.update(overrides)
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**config)).eval()


def tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)
    config.update(overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


MODEL_FACTORIES = {"gpt2": tiny_gpt2, "llama": tiny_llama}


@pytest.fixture(scope="module", params=sorted(MODEL_FACTORIES))
def converted(request):
    """(name, dense model, routed model with 3 modalities, init='copy')."""
    import sparsify

    dense = MODEL_FACTORIES[request.param]()
    return request.param, dense, sparsify.convert(dense, modalities=3)
