"""The README's quick start runs as written (it is the first code a newcomer copies)."""
import re
from pathlib import Path


def test_readme_quick_start_runs(tmp_path, monkeypatch):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    (code,) = re.findall(r"## Quick start\n\n```python\n(.*?)```", readme, re.S)
    monkeypatch.chdir(tmp_path)  # it saves to out/routed
    namespace: dict = {}
    exec(compile(code, "README.md quick start", "exec"), namespace)
    routed = namespace["routed"]
    assert type(routed).__name__ == "RoutedModel" and (tmp_path / "out/routed/sparsify.json").exists()
    assert namespace["out"].shape == (2, 12)
