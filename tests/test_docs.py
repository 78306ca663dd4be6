"""The documentation site builds in strict mode (a broken link, anchor or API reference fails), and the recipes'
self-contained code runs as written."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_docs_site_builds_strict(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "Turn a dense model into a modality-routed one" in api and "add_modality" in api
    cli = (tmp_path / "site" / "cli" / "index.html").read_text()
    assert "sparsify add-modality" in cli and "--allow-many-modalities" in cli  # the parser's own --help


def test_recipe_write_and_test_a_pass_runs():
    recipes = (REPO / "docs" / "recipes.md").read_text()
    (code,) = re.findall(r"## Write and test a pass on a toy graph.*?```python\n(.*?)```", recipes, re.S)
    exec(compile(code, "docs/recipes.md", "exec"), {})
