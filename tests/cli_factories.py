"""Model factories named by `sparsify convert --model tests.cli_factories:NAME` in the CLI tests."""
import torch

from tests.toy_models import ToyLM


def toy():
    torch.manual_seed(0)
    return ToyLM(), (torch.randint(0, 50, (2, 7)),)


def toy_wide():
    return ToyLM(d=16), (torch.randint(0, 50, (2, 7)),)
