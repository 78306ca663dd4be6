import subprocess
import sys

import torch

import sparsify
from tests.toy_models import ToyLM


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sparsify.cli", *args], capture_output=True, text=True)


def test_inspect_prints_the_plan_of_a_saved_routed_model(tmp_path):
    torch.manual_seed(0)
    routed = sparsify.convert(ToyLM(), 3, example_inputs=(torch.randint(0, 50, (2, 7)),))
    path = sparsify.save(routed, tmp_path / "toy")
    result = run_cli("inspect", str(path))
    assert result.returncode == 0, result.stderr
    assert "3 modalities" in result.stdout and "layers.0.up.weight" in result.stdout
    assert "ToyLM" in result.stdout


def test_inspect_bad_path_is_one_line_and_exit_2(tmp_path):
    result = run_cli("inspect", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no sparsify.json" in result.stderr
