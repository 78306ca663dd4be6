"""benchmarks/report.py (make bench-report) on recorded outputs: the report keeps every ratio line and each
output, reads back, and the README's table is rewritten between its markers from it (no benchmark runs here)."""
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_report():
    spec = importlib.util.spec_from_file_location("bench_report", REPO / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_round_trip_and_readme_table(tmp_path):
    report = load_report()
    model_out = ("4 x 256 tokens\nLlama, 4 layers x 256\n  dense  278.1 ms   1.00x\n"
                 "  routed 323.7 ms   1.15x (1.10-1.23) (median)\nHF Mamba, 4 layers x 256\n"
                 "  routed 1803.6 ms   1.01x (0.83-1.09) (median)")
    frozen_out = "routed linear backward, 4096 rows: 0.77x (0.76-0.80) (expected ~0.75)"
    results = [{"script": "bench_model.py", "args": [], "seconds": 3, "code": 0, "out": model_out, "err": ""},
               {"script": "bench_frozen.py", "args": [], "seconds": 1, "code": 0, "out": frozen_out, "err": ""},
               {"script": "bench_convert.py", "args": [], "seconds": 1, "code": 1, "out": "", "err": "Boom\n"}]
    path = tmp_path / "benchmarks.md"
    report.write_report(results, path)
    text = path.read_text()
    assert "- machine:" in text and "- versions: python" in text
    assert "| `bench_frozen.py` | routed linear backward, 4096 rows: 0.77x (0.76-0.80) (expected ~0.75) |" in text
    assert "| `bench_convert.py` | FAILED (exit 1) |" in text and "Boom" in text
    back = report.read_report(path)
    assert [(r["script"], r["code"]) for r in back] == [("bench_model.py", 0), ("bench_frozen.py", 0),
                                                         ("bench_convert.py", 1)]
    assert back[0]["out"] == model_out
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.START}\nold table\n{report.END}\n\nafter\n")
    assert report.write_readme_table(back, readme)
    table = readme.read_text()
    assert "old table" not in table and table.endswith("\n\nafter\n")
    assert "| 1.15x (1.10-1.23) / 1.01x (0.83-1.09) |" in table
    assert "| 0.77x (0.76-0.80) |" in table
    assert "failed (see docs/benchmarks.md)" in table and "not run" in table  # convert failed; sharding not run


def test_only_reruns_those_scripts_and_keeps_the_other_outputs(tmp_path, monkeypatch):
    report = load_report()
    old = [{"script": "bench_model.py", "args": [], "seconds": 3, "code": 0, "err": "",
            "out": "Llama\n  routed 323.7 ms   1.15x (1.10-1.23) (median)", "date": "2026-12-01 10:00 UTC"},
           {"script": "bench_frozen.py", "args": [], "seconds": 1, "code": 0, "err": "",
            "out": "routed linear backward, 4096 rows: 0.77x (0.76-0.80)", "date": "2026-12-01 10:05 UTC"}]
    path, readme = tmp_path / "benchmarks.md", tmp_path / "README.md"
    report.write_report(old, path)
    readme.write_text(f"{report.START}\n{report.END}\n")
    rerun = {"script": "bench_frozen.py", "args": [], "seconds": 2, "code": 0, "err": "",
             "out": "routed linear backward, 4096 rows: 0.74x (0.73-0.75)", "date": "2026-12-05 08:00 UTC"}
    monkeypatch.setattr(report, "run", lambda script, args: dict(rerun) if script == "bench_frozen.py" else 1 / 0)
    report.main(["--only", "bench_frozen.py", "--out", str(path), "--readme", str(readme)])
    back = {r["script"]: r for r in report.read_report(path)}
    assert back["bench_model.py"]["out"] == old[0]["out"] and back["bench_model.py"]["date"] == "2026-12-01 10:00 UTC"
    assert back["bench_frozen.py"]["out"] == rerun["out"] and back["bench_frozen.py"]["date"] == "2026-12-05 08:00 UTC"
    table = readme.read_text()
    assert "| 1.15x (1.10-1.23) |" in table and "| 0.74x (0.73-0.75) |" in table
