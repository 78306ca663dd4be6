"""A disk cache of traced pattern graphs, shared by processes (norm_patterns.traced_patterns).

Tracing the ~50 norm spellings with torch.export costs ~2 s, once per process: a third of `sparsify convert`
on a tiny checkpoint, and again in every test worker and subprocess. The traced graphs depend only on torch and
on sparsify's pattern code, so they are written once under the user's cache directory, keyed by both, and read
back in later processes. torch.fx graphs do not pickle as graphs (a GraphModule pickles as code and is traced
again), so each graph is stored as its node list: (op, name, target, args, kwargs), ATen overloads by name and
nodes by name. A cache that is missing, stale, unreadable or corrupted is ignored (traced again, rewritten); a
directory that cannot be written is not an error.

    SPARSIFY_CACHE_DIR   where to keep it (default: $XDG_CACHE_HOME/sparsify, else ~/.cache/sparsify)
"""
from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
from pathlib import Path

import torch
import torch.fx

FORMAT = 1


def cache_dir() -> Path:
    if os.environ.get("SPARSIFY_CACHE_DIR"):
        return Path(os.environ["SPARSIFY_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparsify"


def key(*sources: str) -> str:
    """A key for what the cached graphs depend on: torch's version, this module's encoding (its source) and
    the given source texts (the code that traces them)."""
    digest = hashlib.sha256(f"{FORMAT}|{torch.__version__}".encode())
    digest.update(Path(__file__).read_bytes())
    for source in sources:
        digest.update(source.encode())
    return digest.hexdigest()[:20]


def _encode(value):
    if isinstance(value, torch.fx.Node):
        return ("node", value.name)
    if isinstance(value, torch._ops.OpOverload):
        return ("aten_op", value._schema.name, value._overloadname)
    if isinstance(value, list):  # fx's immutable_list too
        return ("list", [_encode(v) for v in value])
    if isinstance(value, tuple):
        return ("tuple", [_encode(v) for v in value])
    if isinstance(value, dict):  # and immutable_dict
        return ("dict", {k: _encode(v) for k, v in value.items()})
    return ("value", value)  # ints, floats, bools, None, dtypes, builtin functions (operator.getitem): picklable


def _decode(encoded, nodes: dict):
    kind, payload = encoded[0], encoded[1]
    if kind == "node":
        return nodes[payload]
    if kind == "aten_op":
        namespace, name = payload.split("::")
        packet = getattr(getattr(torch.ops, namespace), name)
        return getattr(packet, encoded[2] or "default")
    if kind in ("list", "tuple"):
        items = [_decode(v, nodes) for v in payload]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        return {k: _decode(v, nodes) for k, v in payload.items()}
    return payload


def encode_graph(graph: torch.fx.Graph) -> list:
    return [(n.op, n.name, _encode(n.target) if n.op == "call_function" else n.target, _encode(n.args),
             _encode(n.kwargs)) for n in graph.nodes]


def decode_graph(encoded: list) -> tuple[torch.fx.Graph, dict[str, torch.fx.Node]]:
    """The graph and its nodes by name."""
    graph, nodes = torch.fx.Graph(), {}
    for op, name, target, args, kwargs in encoded:
        if op == "output":
            graph.output(_decode(args, nodes)[0])
            continue
        target = _decode(target, nodes) if op == "call_function" else target
        node = graph.create_node(op, target, _decode(args, nodes), _decode(kwargs, nodes), name=name)
        if node.name != name:
            raise ValueError(f"node name {name!r} came back as {node.name!r}")
        nodes[name] = node
    graph.lint()
    return graph, nodes


def load(name: str, cache_key: str):
    """The object saved under (name, key), or None."""
    path = cache_dir() / f"{name}-{cache_key}.pkl"
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except FileNotFoundError:
        return None
    except Exception:  # unreadable or corrupted: traced again and rewritten
        try:
            path.unlink()
        except OSError:
            pass
        return None


def save(name: str, cache_key: str, value) -> None:
    """Write atomically (a temporary file renamed into place); a directory that cannot be written is skipped."""
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(dir=directory, prefix=f".{name}-", suffix=".partial")
        with os.fdopen(handle, "wb") as f:
            pickle.dump(value, f)
        os.replace(staging, directory / f"{name}-{cache_key}.pkl")
    except OSError:
        return
