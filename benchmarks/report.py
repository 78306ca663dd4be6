"""Run every benchmark at its default size and write docs/benchmarks.md, and the README's results table from it.

    python benchmarks/report.py [--only bench_frozen.py ...] [--out docs/benchmarks.md]    (make bench-report)

--only reruns those scripts and keeps every other run's last output from the existing report.

Each benchmark runs as its own process, as a user would run it. docs/benchmarks.md gets the machine, the date,
the versions, every line of every benchmark's output that states a ratio (with its quartiles where the script
measured them in turns: benchmarks/_interleaved.py), and each output in full. The README's table between its
`<!-- bench-report -->` markers is rewritten from the same run: one row per HEADLINE below, the ratio read
from the line that matched. A benchmark that fails is reported as failed (its last lines), not skipped.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# (script, arguments): every benchmark at its default sizes, the variants the docs quote included.
RUNS = [
    ("bench_model.py", []),
    ("bench_generate.py", []),
    ("bench_generate.py", ["--mamba"]),
    ("bench_routed_ops.py", []),
    ("bench_routed_ops.py", ["--backward"]),
    ("bench_checkpointing.py", []),
    ("bench_frozen.py", []),
    ("bench_sharding.py", []),
    ("bench_convert.py", []),
]
# The README's rows: (label, run, a function of its output lines giving the result).
QUARTILED = re.compile(r"\d+\.\d+x(?: \(\d+\.\d+-\d+\.\d+\))?")


def _ratios(line_pattern: str, join: str = " / "):
    """The ratio (with quartiles) on each output line matching line_pattern, joined."""
    def extract(lines: list[str]) -> str:
        found = [m.group(0) for line in lines if re.search(line_pattern, line) for m in [QUARTILED.search(line)] if m]
        return join.join(found)
    return extract


def _sharding(lines: list[str]) -> str:
    """The range over every row sharded by sparsify.fully_shard of max / (M x dense) and max / min."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if "| sparsify |" in line]
    if not rows:
        return ""
    header = next([c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| model"))
    of_m, spread = header.index("max / (M x dense)"), header.index("max / min")
    values_m, values_spread = [float(r[of_m]) for r in rows], [float(r[spread]) for r in rows]
    return (f"{min(values_m):.3f}-{max(values_m):.3f} x M x dense, max / min {max(values_spread):.3f} "
            f"({len(rows)} configurations)")


def _pattern(pattern: str):
    def extract(lines: list[str]) -> str:
        return "; ".join(m.group(0) for line in lines for m in [re.search(pattern, line)] if m)
    return extract


HEADLINES = [
    ("training step, routed / dense: Llama / HF Mamba / HF Mamba2 / mamba_ssm Mamba1 (4 layers x 256, "
     "4 x 256 tokens, 3 modalities)", ("bench_model.py", []), _ratios(r"^\s*routed")),
    ("decode, Llama, routed / dense tokens/s: new tokens of one modality / of 3 modalities",
     ("bench_generate.py", []), _ratios(r"^\s*routed")),
    ("decode, HF Mamba, the same", ("bench_generate.py", ["--mamba"]), _ratios(r"^\s*routed")),
    ("routed linear op, 8192 x 1024 -> 2816, fwd / fwd+bwd, vs one dense linear",
     ("bench_routed_ops.py", []), _ratios(r"routed_linear \(torch\)\s+\d")),
    ("", ("bench_routed_ops.py", ["--backward"]), _ratios(r"routed_linear \(torch\)\s+\d")),
    ("routed linear backward, 1 of 2 modalities frozen / none (dW skipped; 0.75x expected)",
     ("bench_frozen.py", []), _ratios(r"routed linear backward")),
    ("activation bytes saved for backward, routed / dense: plain, with per-block checkpointing",
     ("bench_checkpointing.py", []), _pattern(r"plain \d+\.\d+x, checkpointed \d+\.\d+x")),
    ("FSDP2 per-rank bytes, 7B-sized, M = 2-4, world 8-256 (fake process group; FSDP, HSDP and FSDP x TP "
     "meshes), `sparsify.fully_shard`",
     ("bench_sharding.py", []), _sharding),
    ("`sparsify convert` of a 1.2 GiB checkpoint: time / copying the bytes it writes; peak RSS / its size",
     ("bench_convert.py", []), _pattern(r"\d+\.\d+x \(target <= 2\)|\d+\.\d+x checkpoint size")),
]
RATIO = re.compile(r"\d+\.\d+x")
START, END = "<!-- bench-report -->", "<!-- /bench-report -->"


def machine() -> list[str]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = ""
    try:
        kib = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal")))
        memory = f", {kib / 2**20:.0f} GiB memory"
    except (OSError, StopIteration, ValueError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("transformers", "triton"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    return [f"- machine: {cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads){memory}, {gpu}",
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())
            + (f", sparsify {commit.stdout.strip()}" if commit.returncode == 0 else "")]


def run(script: str, args: list[str]) -> dict:
    started = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], capture_output=True,
                            text=True, cwd=REPO, env=env)
    return {"script": script, "args": args, "seconds": time.perf_counter() - started, "code": result.returncode,
            "out": result.stdout.rstrip(), "err": result.stderr.rstrip(),
            "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"}


def headline(results: list[dict], run_key, extract) -> str:
    for result in results:
        if (result["script"], result["args"]) != run_key:
            continue
        if result["code"] != 0:
            return "failed (see docs/benchmarks.md)"
        return extract(result["out"].splitlines()) or "not found in the output"
    return "not run"


def write_report(results: list[dict], path: Path) -> None:
    lines = ["# Benchmark results", "",
             "Generated by `make bench-report` (`benchmarks/report.py`): every benchmark at its default size, each "
             "in its own process. Ratios are against a baseline measured in the same run, in turns (median of the "
             "paired ratios, quartiles in brackets). Older numbers are in the history of this file.", ""]
    lines += machine() + ["", "## Every ratio", "", "| benchmark | line |", "|---|---|"]
    for result in results:
        command = " ".join([result["script"], *result["args"]])
        if result["code"] != 0:
            lines.append(f"| `{command}` | FAILED (exit {result['code']}) |")
            continue
        for line in result["out"].splitlines():
            if RATIO.search(line) or line.startswith("| "):
                cell = line.strip().strip("|").replace("|", "/")
                lines.append(f"| `{command}` | {cell} |")
    lines += ["", "## Outputs", ""]
    for result in results:
        command = " ".join(["python benchmarks/" + result["script"], *result["args"]])
        status = "ok" if result["code"] == 0 else f"FAILED (exit {result['code']})"
        lines += [f"### `{command}`", "", f"{result['seconds']:.0f} s, {status}, {result.get('date', '')}", "",
                  "```text", result["out"]]
        if result["code"] != 0:
            lines += ["--- stderr (last lines) ---", *result["err"].splitlines()[-15:]]
        lines += ["```", ""]
    path.write_text("\n".join(lines))


def write_readme_table(results: list[dict], readme: Path) -> bool:
    text = readme.read_text()
    if START not in text or END not in text:
        return False
    rows = ["| benchmark (docs/benchmarks.md) | result |", "|---|---|"]
    for label, run_key, extract in HEADLINES:
        value = headline(results, run_key, extract)
        if label:
            rows.append(f"| {label} | {value} |")
        else:  # a second run of the row above: its value in the same cell
            rows[-1] = rows[-1][:-2] + f" / {value} |"
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    readme.write_text(before + START + "\n" + "\n".join(rows) + "\n" + END + after)
    return True


def read_report(path: Path) -> list[dict]:
    """The runs a report holds (its Outputs section), to rewrite the README's table without running again."""
    results = []
    pattern = re.compile(r"### `python benchmarks/(\S+)((?: \S+)*)`\n\n(\d+) s, (ok|FAILED[^,\n]*)(?:, ([^\n]*))?\n\n"
                         r"```text\n(.*?)\n```", re.S)
    for script, args, seconds, status, date, out in pattern.findall(path.read_text()):
        results.append({"script": script, "args": args.split(), "code": 0 if status == "ok" else 1,
                        "out": out.split("\n--- stderr")[0], "err": "", "seconds": int(seconds), "date": date})
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", help="scripts to run (default: all)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    parser.add_argument("--readme-only", action="store_true",
                        help="rewrite the README's table from the existing report, running nothing")
    args = parser.parse_args(argv)
    if args.readme_only:
        write_readme_table(read_report(args.out), args.readme)
        print(f"wrote {args.readme} from {args.out}")
        return
    # --only reruns some benchmarks and keeps the others' last outputs (each output says when it ran)
    earlier = {(r["script"], tuple(r["args"])): r for r in read_report(args.out)} if args.only and \
        args.out.exists() else {}
    results = []
    for script, script_args in RUNS:
        if args.only and script not in args.only:
            if (script, tuple(script_args)) in earlier:
                results.append(earlier[(script, tuple(script_args))])
            continue
        print(f"running {script} {' '.join(script_args)}", flush=True)
        results.append(run(script, script_args))
        print(f"  {results[-1]['seconds']:.0f} s, exit {results[-1]['code']}", flush=True)
    write_report(results, args.out)
    wrote = [str(args.out)]
    if write_readme_table(results, args.readme):
        wrote.append(str(args.readme))
    print(f"wrote {', '.join(wrote)}")


if __name__ == "__main__":
    main()
