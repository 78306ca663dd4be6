"""Timing shared by the benchmarks that compare a routed model with its dense model in one run."""
import statistics
import time


class Timings:
    """Per-run samples, one per repeat, taken in turns (see interleaved)."""

    def __init__(self, samples: dict):
        self.samples = samples

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def ratios(self, name: str, baseline: str) -> list[float]:
        """name's time over baseline's, repeat by repeat (the two ran back to back)."""
        return [a / b for a, b in zip(self.samples[name], self.samples[baseline])]

    def ratio(self, name: str, baseline: str) -> str:
        """The median of the paired ratios with their interquartile range, e.g. '1.04x (1.01-1.08)'. A slow
        spell of the machine moves both runs of a pair: the paired ratio is steadier than a ratio of
        medians (on this machine a 32 MiB tensor's page faults alone moved a step by 20%)."""
        ratios = self.ratios(name, baseline)
        if len(ratios) < 4:
            return f"{statistics.median(ratios):.2f}x"
        q1, q2, q3 = statistics.quantiles(ratios, n=4)
        return f"{q2:.2f}x ({q1:.2f}-{q3:.2f})"


def interleaved(runs: dict, repeats: int, sync=None) -> Timings:
    """One warm-up call each (it captures the routed graphs), then the runs take turns within each repeat, so
    a slow spell of this shared machine falls on all of them alike rather than on whichever ran then (run
    one after the other, ratios moved by 0.1 here); the order of the turns alternates from repeat to repeat,
    so no run always follows the same one. `sync`: called before each clock read (torch.cuda.synchronize
    on a GPU)."""
    for run in runs.values():
        run()
    samples = {name: [] for name in runs}
    names = list(runs)
    for repeat in range(repeats):
        for name in (names if repeat % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            runs[name]()
            if sync is not None:
                sync()
            samples[name].append(time.perf_counter() - start)
    return Timings(samples)

