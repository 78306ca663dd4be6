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


def test_make_demo_leads_with_the_results_and_prints_no_warnings():
    """`make demo` as a newcomer sees it (a subprocess): one heading per model, then what was converted, the
    parameters before/after, verified equal with its error, a routed forward, a step, a generate, a reload;
    nothing on stderr (no warnings, no export logs); the plan table only with --verbose."""
    import subprocess
    import sys

    repo = Path(__file__).parent.parent
    result = subprocess.run([sys.executable, "demos/convert_tiny_transformer.py"], capture_output=True, text=True,
                            cwd=repo, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""
    lines = [line for line in result.stdout.splitlines() if line]
    headings = [i for i, line in enumerate(lines) if line.startswith("== ")]
    assert len(headings) == 2 and headings[0] == 0
    for start in headings:
        block = lines[start + 1:start + 8]
        assert [line.split(" ")[0] for line in block] == ["converted", "parameters:", "verified", "routed",
                                                          "training", "generate,", "saved"]
        assert "verified equal to dense at init: OK" in block[2] and "outputs identical True" in block[6]
    assert "RoutingPlan" not in result.stdout  # the compiler's detail is behind --verbose
