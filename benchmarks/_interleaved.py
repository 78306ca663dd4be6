"""Timing shared by the benchmarks that compare a routed model with its dense model in one run."""
import statistics
import time


def interleaved_medians(runs: dict, repeats: int, sync=None) -> dict:
    """{name: median seconds of run()}. One warm-up call each (it captures the routed graphs), then the runs
    take turns within each repeat, so a slow spell of this shared machine falls on all of them alike rather
    than on whichever ran then (run one after the other, ratios moved by 0.1 here). `sync`: called before
    each clock read (torch.cuda.synchronize on a GPU)."""
    for run in runs.values():
        run()
    samples = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if sync is not None:
                sync()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}
