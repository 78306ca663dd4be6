import sympy

from sparsify.passes.token_axes import TokenAxes, find_token_axes

B, T = sympy.symbols("s0 s1", positive=True, integer=True)


def test_split_flat_and_seq_first():
    assert find_token_axes((B, T, 8), (B, T)) == TokenAxes((0, 1))
    assert find_token_axes((B, 8, T), (B, T)) == TokenAxes((0, 2))
    assert find_token_axes((T, B, 8), (B, T)) == TokenAxes((1, 0))
    assert find_token_axes((B * T, 8), (B, T)) == TokenAxes((0,))
    assert find_token_axes((8, T * B), (B, T)) == TokenAxes((1,))


def test_batch_of_one_and_single_token():
    assert find_token_axes((1, T, 8), (1, T)) == TokenAxes((1,))
    assert find_token_axes((1, 1, 8), (1, 1)) == TokenAxes((0,))


def test_one_new_token_per_sequence_is_the_batch_dim():
    # A decoding step (sequence 1): [B, 1, D], the flattened [B * 1, D] and [B, D] all hold one token per row;
    # batch * seq equals batch, which is no ambiguity (Qwen3-Next, Zamba2 decode steps reshape through both).
    assert find_token_axes((B, 1, 32), (B, 1)) == TokenAxes((0,), seq_index=0)
    assert find_token_axes((32, B), (B, 1)) == TokenAxes((1,), seq_index=0)
    assert find_token_axes((2, 1, 32), (2, 1)) == TokenAxes((0,), seq_index=0)
    assert "2 dims of the batch size" in find_token_axes((2, 1, 2), (2, 1))  # a feature dim equals the batch


def test_missing_and_ambiguous_are_reported_not_guessed():
    assert "no dim" in find_token_axes((8, 4), (B, T))
    assert "ambiguously" in find_token_axes((2, 2, 8), (2, 2))        # static batch == seq
    assert "ambiguously" in find_token_axes((2, 7, 2), (2, 7))        # a feature dim equals the batch


def test_a_slice_of_the_sequence_is_reported():
    assert "part of the sequence" in find_token_axes((B, 8), (B, T))
