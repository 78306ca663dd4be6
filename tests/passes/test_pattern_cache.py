"""The disk cache of traced norm patterns (passes/pattern_cache.py): a later process reads the graphs an earlier
one traced, structurally identical, without tracing; a corrupted or foreign cache file is traced over."""
import pytest

from sparsify.passes import norm_patterns, pattern_cache


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSIFY_CACHE_DIR", str(tmp_path))
    norm_patterns.traced_patterns.cache_clear()
    yield tmp_path
    norm_patterns.traced_patterns.cache_clear()  # later tests trace or read the default cache again


def structure(patterns):
    return [norm_patterns._encoded(p) for p in patterns]


def test_a_later_process_reads_the_patterns_without_tracing(cache, monkeypatch):
    traced = norm_patterns.traced_patterns()
    (written,) = cache.glob("norm_patterns-*.pkl")
    norm_patterns.traced_patterns.cache_clear()  # as a new process

    def no_tracing(*args):
        raise AssertionError("traced although the cache holds the patterns")

    monkeypatch.setattr(norm_patterns, "_export_separately", no_tracing)
    read = norm_patterns.traced_patterns()
    assert structure(read) == structure(traced) and len(read) > 50
    for pattern in read:  # placeholders the match filter reads are the graph's own nodes
        assert all(n.graph is pattern.graph for n in [*pattern.inputs, pattern.eps, *pattern.sizes, *pattern.dtypes])
    assert written.exists()


def test_a_corrupted_cache_is_traced_over(cache):
    traced = norm_patterns.traced_patterns()
    (written,) = cache.glob("norm_patterns-*.pkl")
    written.write_bytes(b"not a pickle")
    norm_patterns.traced_patterns.cache_clear()
    assert structure(norm_patterns.traced_patterns()) == structure(traced)
    assert pattern_cache.load("norm_patterns", written.stem.split("-", 1)[1]) is not None  # rewritten


def test_an_unwritable_cache_directory_is_not_an_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SPARSIFY_CACHE_DIR", str(blocker / "sub"))  # cannot be created
    pattern_cache.save("x", "k", [1, 2])
    assert pattern_cache.load("x", "k") is None
