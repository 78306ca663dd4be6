"""Our streaming safetensors reader/writer agree with the safetensors library, both ways."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import sparsify
from sparsify.safetensors_io import (OutputTensor, iter_chunks, read_checkpoint_dir, read_header, read_tensor,
                                     write_checkpoint)
from tests.toy_models import ToyLM

TENSORS = {
    "a.weight": torch.randn(5, 3),
    "b.bf16": torch.randn(7).to(torch.bfloat16),
    "c.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    "d.scalar": torch.tensor(2.5),
}


def test_reads_library_files(tmp_path):
    save_file(TENSORS, tmp_path / "model.safetensors")
    entries = read_checkpoint_dir(tmp_path)
    for name, tensor in TENSORS.items():
        assert torch.equal(read_tensor(entries[name]), tensor)
        assert torch.equal(torch.cat(list(iter_chunks(entries[name], chunk_bytes=8))), tensor.reshape(-1))


def test_library_reads_our_files_including_shards(tmp_path):
    outputs = [OutputTensor(n, t.dtype, tuple(t.shape), lambda t=t: iter(t.reshape(-1).split(2)))
               for n, t in TENSORS.items()]
    names = write_checkpoint(tmp_path, outputs, max_shard_bytes=40)
    assert len(names) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    loaded = {}
    for name in names:
        loaded.update(load_file(tmp_path / name))
    assert loaded.keys() == TENSORS.keys()
    for name, tensor in TENSORS.items():
        assert torch.equal(loaded[name], tensor)
    assert {n: read_tensor(e).shape for n, e in read_checkpoint_dir(tmp_path).items()} == \
        {n: t.shape for n, t in TENSORS.items()}


def test_truncation_and_corruption_are_named(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(TENSORS, path)
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(sparsify.SparsifyError, match="is truncated"):
        read_header(path)
    path.write_bytes(data[:8] + b"{" * (len(data) - 8))
    with pytest.raises(sparsify.SparsifyError, match="corrupted"):
        read_header(path)


def test_sharded_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    tokens = torch.randint(0, 50, (2, 7))
    routed = sparsify.convert(ToyLM(), 3, example_inputs=(tokens,))
    path = sparsify.save(routed, tmp_path / "toy", max_shard_bytes=2000)
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 1
    loaded = sparsify.load(path, model=ToyLM)
    ids = torch.randint(0, 3, (2, 7))
    assert torch.equal(loaded(tokens, modality_ids=ids), routed(tokens, modality_ids=ids))


def test_copies_of_source_bytes_write_the_same_file_as_chunks(tmp_path, monkeypatch):
    """A tensor made of copies of a source tensor's bytes is copied file to file (sendfile): the file is
    byte for byte the one written chunk by chunk, and progress counts every byte."""
    save_file(TENSORS, tmp_path / "source.safetensors")
    entries = {e.name: e for e in read_header(tmp_path / "source.safetensors")}

    def outputs(byte_copy):
        made = []
        for name, entry in entries.items():
            copies = 3 if name == "a.weight" else 1
            made.append(OutputTensor(name, entry.dtype, (copies, *entry.shape) if copies > 1 else entry.shape,
                                     lambda e=entry, c=copies: (chunk for _ in range(c) for chunk in iter_chunks(e)),
                                     entry if byte_copy else None))
        return made

    counted, sendfile_calls = [], []
    real_sendfile = os.sendfile
    monkeypatch.setattr("os.sendfile", lambda *a: sendfile_calls.append(a) or real_sendfile(*a))
    (tmp_path / "copied").mkdir()
    (tmp_path / "chunked").mkdir()
    write_checkpoint(tmp_path / "copied", outputs(True), max_shard_bytes=2**30, progress=counted.append)
    assert len(sendfile_calls) == 3 + len(entries) - 1  # one call per copy of each (small) tensor
    write_checkpoint(tmp_path / "chunked", outputs(False), max_shard_bytes=2**30)
    copied = (tmp_path / "copied" / "model.safetensors").read_bytes()
    assert copied == (tmp_path / "chunked" / "model.safetensors").read_bytes()
    assert sum(counted) == sum(t.nbytes for t in outputs(True))
    loaded = load_file(tmp_path / "copied" / "model.safetensors")
    assert torch.equal(loaded["a.weight"], TENSORS["a.weight"].expand(3, 5, 3))
    # where the kernel refuses sendfile, the same bytes go through reads and writes
    def refused(*args):
        raise OSError("sendfile refused")

    monkeypatch.setattr("os.sendfile", refused)
    (tmp_path / "refused").mkdir()
    write_checkpoint(tmp_path / "refused", outputs(True), max_shard_bytes=2**30)
    assert (tmp_path / "refused" / "model.safetensors").read_bytes() == copied
    # a cast cannot be a byte copy: the chunks are written, converted
    cast = OutputTensor("a.weight", torch.bfloat16, (5, 3), lambda: iter_chunks(entries["a.weight"]),
                        entries["a.weight"])
    assert not cast.copies
