"""The `sparsify` CLI on checkpoints the tests write: `sparsify.cli.main` in this process (a subprocess per
command paid ~4 s of Python and library start each), and once as the installed command in a subprocess."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import sparsify
from sparsify.cli import main
from tests.cli_factories import toy
from tests.conftest import tiny_gpt2, tiny_llama
from tests.test_convert_mamba_hf import tiny_mamba

REPO = Path(__file__).resolve().parents[1]


def cli(*args):
    """`sparsify ARGS` in this process: its exit code and what it printed. An exception escaping main (what
    a user would see as a traceback) fails the test."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        returncode = main(list(map(str, args)))
    return SimpleNamespace(returncode=returncode, stdout=stdout.getvalue(), stderr=stderr.getvalue())


def cli_subprocess(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "sparsify.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def check_equal_to_dense(dst, dense, model=None, dtype=torch.float32):
    routed = sparsify.load(dst, model=model)
    tokens = torch.randint(0, 50, (3, 11))
    ids = torch.randint(0, 3, (3, 11))
    with torch.no_grad():
        got = routed(tokens, modality_ids=ids)
        want = dense(tokens, use_cache=False) if model is None else dense(tokens)
    got, want = (got.logits, want.logits) if model is None else (got, want)
    assert got.dtype == dtype
    assert rel_err(got.float(), want.float()) <= (1e-5 if dtype == torch.float32 else 2e-2)
    return routed


@pytest.mark.parametrize("factory,shard", [(tiny_gpt2, None), (tiny_llama, "20KB"), (tiny_mamba, None)])
def test_convert_hugging_face_directory(tmp_path, factory, shard):
    dense = factory()
    src = tmp_path / "dense"
    dense.save_pretrained(src, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (src / "model.safetensors.index.json").exists()
    dst = tmp_path / "routed"
    extra = ["--max-shard-size", "40KB"] if shard else []
    result = cli("convert", src, "-o", dst, "--modalities", 3, *extra)
    assert result.returncode == 0, result.stderr
    assert "verify OK" in result.stdout and "max rel err" in result.stdout
    assert (dst / "config.json").exists() and (dst / "sparsify.json").exists()
    if shard:
        assert len(list(dst.glob("model-*-of-*.safetensors"))) > 1
    routed = check_equal_to_dense(dst, dense)
    assert json.loads((dst / "sparsify.json").read_text())["modalities"] == 3
    assert routed.plan.routed == sparsify.convert(dense, 3, verify=False).plan.routed


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_convert_state_dict_with_factory(tmp_path, suffix):
    dense, _ = toy()
    src = tmp_path / f"toy{suffix}"
    if suffix == ".pt":
        torch.save(dense.state_dict(), src)
    else:
        from safetensors.torch import save_file
        save_file(dense.state_dict(), src)
    dst = tmp_path / "routed"
    result = cli("convert", src, "-o", dst, "--modalities", 3, "--model", "tests.cli_factories:toy", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    check_equal_to_dense(dst, dense, model=toy)


def toy_state_dict_file(tmp_path):
    """(the toy model, its state dict saved as toy.pt)"""
    dense, _ = toy()
    src = tmp_path / "toy.pt"
    torch.save(dense.state_dict(), src)
    return dense, src


def test_dtype_and_independent_init(tmp_path):
    dense, src = toy_state_dict_file(tmp_path)
    dst = tmp_path / "bf16"
    result = cli("convert", src, "-o", dst, "--modalities", 3, "--model", "tests.cli_factories:toy",
                 "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    check_equal_to_dense(dst, dense.to(torch.bfloat16), model=toy, dtype=torch.bfloat16)
    result = cli("verify", src, dst, "--model", "tests.cli_factories:toy")
    assert result.returncode == 0 and "dtype bfloat16" in result.stdout, (result.stdout, result.stderr)
    dst = tmp_path / "independent"
    result = cli("convert", src, "-o", dst, "--modalities", 2, "--model", "tests.cli_factories:toy",
                 "--policy", "none", "--include", r"\.up\.weight$", "--init", "independent")
    assert result.returncode == 0, result.stderr
    weight = sparsify.load(dst, model=toy).get_parameter("layers.0.up.weight")
    assert weight.shape[0] == 2 and not torch.equal(weight[0], weight[1])


def test_inspect_dense_and_routed_and_verify(tmp_path):
    dense = tiny_llama()
    src = tmp_path / "dense"
    dense.save_pretrained(src)
    result = cli("inspect", src, "--modalities", 2)
    assert result.returncode == 0, result.stderr
    assert "would route" in result.stdout and "model.layers.0.mlp.up_proj.weight" in result.stdout
    dst = tmp_path / "routed"
    assert cli("convert", src, "-o", dst, "--modalities", 2, "--no-verify", "--quiet").returncode == 0
    result = cli("inspect", dst)
    assert result.returncode == 0 and "2 modalities" in result.stdout and "LlamaForCausalLM" in result.stdout
    assert "every routed one [2, ...]" in result.stdout
    broken = tmp_path / "truncated"
    shutil.copytree(dst, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])   # a copy cut short
    result = cli("inspect", broken)
    assert result.returncode == 2 and "truncated" in result.stderr, (result.stdout, result.stderr)
    assert "per modality:" in result.stdout and "compute per token unchanged" in result.stdout
    svg = tmp_path / "routed.svg"
    result = cli("inspect", dst, "--graph", svg)
    assert result.returncode == 0, result.stderr
    drawing = svg.read_text()
    assert drawing.startswith("<?xml") and "routed_linear" in drawing and "model.layers.1" in drawing
    assert "self_attn.q_proj weight (routed_linear)" in drawing  # routed ops named by the parameters they read
    assert "token permutations of the hoist pass" in drawing     # counted apart from the routed ops
    png = tmp_path / "routed.png"
    assert cli("inspect", dst, "--graph", png).returncode == 0 and png.read_bytes().startswith(b"\x89PNG")
    result = cli("inspect", src, "--graph", svg)  # a dense source has no routed graph yet
    assert result.returncode == 2 and "convert the checkpoint first" in result.stderr
    result = cli("verify", src, dst)
    assert result.returncode == 0 and "verify OK" in result.stdout
    # a routed checkpoint whose copies no longer match the dense weights fails verification: exit 1
    routed = sparsify.load(dst)
    with torch.no_grad():
        weight = routed.get_parameter("model.layers.1.mlp.up_proj.weight")[1]
        weight.add_(torch.randn_like(weight))
    sparsify.save(routed, dst, overwrite=True)
    result = cli("verify", src, dst)
    assert result.returncode == 1 and "MISMATCH" in result.stdout and "first divergent" in result.stdout


def test_bad_inputs_exit_2_with_one_clear_line(tmp_path):
    dense, _ = toy()
    src = tmp_path / "toy.safetensors"
    from safetensors.torch import save_file
    save_file(dense.state_dict(), src)
    dst = tmp_path / "out"

    def fails(*args, message):
        result = cli(*args)
        assert result.returncode == 2, (result.stdout, result.stderr)
        assert message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert not dst.exists()

    fails("convert", src, "-o", dst, "--modalities", 3, message="plain state dict: name the module")
    fails("convert", src, "-o", dst, "--modalities", 3, "--model", "tests.cli_factories:nope",
          message="cannot import the model factory")
    fails("convert", src, "-o", dst, "--modalities", 3, "--model", "tests.cli_factories:toy_wide",
          message="does not match ToyLM")
    fails("convert", src, "-o", dst, "--modalities", 3, "--model", "tests.cli_factories:toy", "--policy", "moe",
          message="invalid choice: 'moe'")
    fails("convert", src, "-o", dst, "--modalities", 3, "--model", "tests.cli_factories:toy", "--include", "(",
          message="is not a valid regular expression")
    fails("convert", tmp_path / "missing.pt", "-o", dst, "--modalities", 3, message="does not exist")

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(src.read_bytes()[:-100])
    fails("convert", truncated, "-o", dst, "--modalities", 3, "--model", "tests.cli_factories:toy",
          message="is truncated")

    assert cli("convert", src, "-o", dst, "--modalities", 3, "--model", "tests.cli_factories:toy",
               "--quiet").returncode == 0
    result = cli("convert", src, "-o", dst, "--modalities", 3, "--model", "tests.cli_factories:toy")
    assert result.returncode == 2 and "already exists" in result.stderr
    result = cli("convert", dst, "-o", tmp_path / "again", "--modalities", 3)
    assert result.returncode == 2 and "already routed" in result.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging leftovers


def test_the_installed_command_converts_and_exits_2_on_bad_input(tmp_path):
    """`python -m sparsify.cli` as a user runs it: exit codes, quiet output, one clear line and no traceback."""
    dense, src = toy_state_dict_file(tmp_path)
    dst = tmp_path / "out"
    result = cli_subprocess("convert", src, "-o", dst, "--modalities", 3, "--model", "tests.cli_factories:toy",
                            "--quiet")
    assert result.returncode == 0 and result.stdout == "", result.stderr
    check_equal_to_dense(dst, dense, model=toy)
    result = cli_subprocess("convert", src, "-o", dst, "--modalities", 3, "--model", "tests.cli_factories:toy")
    assert result.returncode == 2 and "already exists" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_choices_are_the_librarys_and_answer_before_any_work(tmp_path):
    from sparsify import cli as cli_module
    from sparsify.convert_checkpoint import DTYPE_CHOICES
    from sparsify.plan import INIT_MODES, POLICIES

    assert (cli_module.POLICIES, cli_module.INIT_MODES, cli_module.DTYPES) == (POLICIES, INIT_MODES,
                                                                                tuple(DTYPE_CHOICES))
    help_text = cli("convert", "--help").stdout
    assert "{auto,mot,mom,all,none}" in help_text and "{copy,independent}" in help_text
    existing = tmp_path / "out"
    existing.mkdir()
    result = cli("convert", tmp_path / "missing.pt", "-o", existing, "--modalities", 3)
    assert result.returncode == 2 and "already exists" in result.stderr  # before looking at the source


def test_verify_with_its_arguments_swapped_says_so(tmp_path):
    dense, src = toy_state_dict_file(tmp_path)
    dst = tmp_path / "out"
    assert cli("convert", src, "-o", dst, "--modalities", 3, "--model", "tests.cli_factories:toy",
               "--quiet").returncode == 0
    result = cli("verify", dst, src, "--model", "tests.cli_factories:toy")
    assert result.returncode == 2 and "arguments are swapped" in result.stderr, result.stderr
    assert f"sparsify verify {src} {dst}" in result.stderr


def test_help_and_bad_arguments_answer_without_importing_torch(tmp_path):
    """The installed command's module parses and checks its arguments before importing the package: --help,
    a bad choice, a bad regex, a bad image suffix, an existing output and a missing input each exit with
    torch never imported (what made them take 4 s)."""
    existing = tmp_path / "out"
    existing.mkdir()
    cases = [(["--help"], 0), (["convert", "--help"], 0),
             (["convert", str(tmp_path), "-o", str(tmp_path / "new"), "--modalities", "3", "--policy", "bogus"], 2),
             (["convert", str(tmp_path), "-o", str(tmp_path / "new"), "--modalities", "3", "--include", "("], 2),
             (["inspect", str(tmp_path), "--drift", "drift.txt"], 2),
             (["convert", str(tmp_path), "-o", str(existing), "--modalities", "3"], 2),
             (["verify", str(tmp_path / "missing"), str(tmp_path)], 2),
             (["convert", str(tmp_path), "-o", str(tmp_path / "new"), "--modalities", "300"], 2),
             (["convert", str(tmp_path), "-o", str(tmp_path / "new"), "--modalities", "3", "--model", "toy"], 2)]
    script = ("import contextlib, io, json, sys, sparsify_cli\n"
              "out = []\n"
              "for argv, _ in json.loads(sys.argv[1]):\n"
              "    err = io.StringIO()\n"
              "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):\n"
              "        code = sparsify_cli.main(argv)\n"
              "    out.append([code, err.getvalue()])\n"
              "print(json.dumps([out, 'torch' in sys.modules, 'sparsify' in sys.modules]))\n")
    result = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    outcomes, torch_imported, package_imported = json.loads(result.stdout)
    assert not torch_imported and not package_imported
    assert [code for code, _ in outcomes] == [expected for _, expected in cases]
    messages = [err for _, err in outcomes]
    assert "invalid choice: 'bogus'" in messages[2] and "not a valid regular expression" in messages[3]
    assert ".png, .svg or .pdf" in messages[4] and "already exists" in messages[5]
    assert "missing does not exist" in messages[6] and "--allow-many-modalities" in messages[7]
    assert "must look like package.module:factory" in messages[8]
