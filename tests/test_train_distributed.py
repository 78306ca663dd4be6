"""The distributed training demo (demos/train_distributed.py) under torchrun on 2 CPU processes: a run
stopped and resumed from its DCP checkpoint logs the same losses as an uninterrupted one (fp32: equal)."""
import json
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "demos" / "train_distributed.py"


def torchrun(*args):
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--standalone", str(DEMO), "--steps", "8", "--checkpoint-every", "2", *args],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]


def test_a_resumed_run_logs_the_uninterrupted_runs_losses(tmp_path):
    torchrun("--out", str(tmp_path / "whole"))
    torchrun("--out", str(tmp_path / "stopped"), "--stop-after", "4")
    assert [r["step"] for r in losses(tmp_path / "stopped")] == [1, 2, 3, 4]
    assert "resumed from" in torchrun("--out", str(tmp_path / "stopped"), "--resume")
    whole, resumed = losses(tmp_path / "whole"), losses(tmp_path / "stopped")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert resumed == whole   # every step's loss and per-modality losses, exactly
    assert whole[-1]["loss"] < whole[0]["loss"] and {"text", "image", "signal"} <= whole[0].keys()
