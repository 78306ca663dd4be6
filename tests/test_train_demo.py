"""The training demo (demos/train_multimodal.py) runs end to end on a tiny config."""
import csv
import importlib.util
import math
import sys
from pathlib import Path


DEMO = Path(__file__).parents[1] / "demos" / "train_multimodal.py"


def load_demo():
    spec = importlib.util.spec_from_file_location("train_multimodal", DEMO)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_corpus_interleaves_three_modalities_in_disjoint_vocabulary_ranges():
    demo = load_demo()
    train, test = demo.split_pools(seed=0)
    assert len(train.text) > 100 and len(test.text) > 10 and len(train.image) > 1000
    import numpy as np
    tokens, ids = demo.sequences(train, 8, 64, np.random.default_rng(0))
    assert tokens.shape == ids.shape == (8, 65)
    for modality, (low, high) in enumerate(zip(demo.OFFSETS, demo.OFFSETS[1:] + (demo.VOCAB,))):
        chosen = tokens[ids == modality]
        assert chosen.numel() > 0 and int(chosen.min()) >= low and int(chosen.max()) < high


def test_training_demo_runs_and_losses_fall(tmp_path):
    demo = load_demo()
    result = demo.main(["--steps", "12", "--size", "tiny", "--batch", "4", "--length", "48", "--eval-every", "6",
                        "--lr", "1e-2", "--warmup", "2", "--out", str(tmp_path)])
    for name, losses in result["train_losses"].items():
        assert len(losses) == 12 and all(math.isfinite(x) for x in losses), name
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, f"{name}: training loss did not fall: {losses}"
    held_out = {(r["model"], r["modality"], r["step"]): r["loss"] for r in result["curve"]}
    for model in ("transformer", "MoT", "mamba", "MoM"):
        assert all(math.isfinite(held_out[(model, m, s)]) for m in demo.MODALITIES for s in (0, 6, 12))
        assert sum(held_out[(model, m, 12)] for m in demo.MODALITIES) < sum(held_out[(model, m, 0)]
                                                                            for m in demo.MODALITIES), model
    rows = list(csv.DictReader(open(result["csv"])))
    assert len(rows) == 4 * 3 * 3 and {r["model"] for r in rows} == {"transformer", "MoT", "mamba", "MoM"}
    png = Path(result["png"]).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_steps_to_match_reads_the_curves():
    demo = load_demo()
    curve = [{"model": model, "step": step, "modality": m, "loss": loss}
             for m in demo.MODALITIES
             for model, losses in (("transformer", [5.0, 3.0, 2.0]), ("MoT", [5.0, 1.9, 1.5]))
             for step, loss in zip((0, 5, 10), losses)]
    assert demo.steps_to_match(curve, "transformer", "MoT", 10) == {m: 0.5 for m in demo.MODALITIES}
    slower = [dict(r, loss=r["loss"] + 1) if r["model"] == "MoT" else r for r in curve]
    assert demo.steps_to_match(slower, "transformer", "MoT", 10) == {m: None for m in demo.MODALITIES}


def test_init_copy_starts_every_routed_model_at_its_dense_model(tmp_path):
    """The upcycling case: before any step, each routed model's held-out loss is its dense model's (fp32)."""
    demo = load_demo()
    result = demo.main(["--steps", "2", "--size", "tiny", "--batch", "2", "--length", "32", "--eval-every", "2",
                        "--init", "copy", "--out", str(tmp_path)])
    held_out = {(r["model"], r["modality"], r["step"]): r["loss"] for r in result["curve"]}
    for dense, routed in demo.PAIRS:
        for modality in demo.MODALITIES:
            a, b = held_out[(dense, modality, 0)], held_out[(routed, modality, 0)]
            assert abs(a - b) <= 1e-5 * abs(a), (dense, routed, modality, a, b)


def test_seeds_report_mean_and_spread(tmp_path):
    demo = load_demo()
    result = demo.main(["--steps", "2", "--seeds", "2", "--size", "tiny", "--batch", "2", "--length", "32",
                        "--eval-every", "2", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(result["csv"])))
    assert {r["seed"] for r in rows} == {"0", "1"} and len(rows) == 2 * 4 * 3 * 2
    table = demo.report(result["curve"], 2)
    assert "over 2 seed(s)" in table
    final = [float(r["loss"]) for r in rows if r["model"] == "MoT" and r["modality"] == "text" and r["step"] == "2"]
    mean = sum(final) / 2
    assert f"{mean:.3f} [{min(final):.3f}, {max(final):.3f}]" in table  # the text row's MoT cell
