"""A representative subset of benchmarks/sweep_families.py's rows, run by its own code in `make test` (the full sweep
over every causal-LM family takes most of an hour: docs/families.md). Each family stands for a form the sweep found:
multi-head latent attention (DeepSeek-V3: its cache holds the compressed latents of earlier tokens, so generation
falls back to uncached), a hybrid whose tiny config keeps one layer of each kind (LFM2: short convolutions and
attention), a config with no length limit (XLNet: its generate feeds a two-stream query whose rows pick their target
positions by target_mapping: routed by the picked tokens, with the cache), a projection also applied to a zero state
before the first token (Zaya's delayed value: modality 0's copy there, generation with the cache), a learned prompt
before the tokens (CPM-Ant: the blocks run over prompt + tokens, routed with ids laid out the same way; its prompt
overflows a static cache sized for the tokens, so generation falls back to uncached). (ProphetNet's n-gram streams
laid out after the tokens take ~30 s at its tiny config's 12 layers: the sweep covers them,
tests/test_block_forms.py the form. DeepSeek-V4, whose compressed attention's summary parameters have no token to
route by and whose layers transformers' static cache does not know, takes ~30 s: the sweep covers it;
tests/test_errors.py and tests/test_generation.py test those two behaviours on small models.)"""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from sweep_families import one_family  # noqa: E402

GENERATE = {"cpmant": "yes, uncached", "deepseek_v3": "yes, uncached", "lfm2": "yes", "xlnet": "yes",
            "zaya": "yes"}


@pytest.mark.parametrize("family", sorted(GENERATE))
def test_family_row(family):
    row = one_family(family)
    assert row["built"] == "yes" and row["converted"] == "yes", row
    assert isinstance(row["equal"], float) and row["equal"] <= 1e-5, row  # fp32, a shape other than the capture's
    assert row["real"] == "yes", row
    assert row["mot"] >= 0.9, row
    assert str(row["generate"]).startswith(GENERATE[family]), row
