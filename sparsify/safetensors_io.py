"""Streaming safetensors reading and writing, one chunk of one tensor at a time.

The safetensors library reads through mmap, which makes every page it touches
resident and counts it in the process's RSS; converting a checkpoint larger
than memory must not. So the header is parsed here and tensor bytes are copied
with plain file reads in bounded chunks. The format: 8-byte little-endian header
length, a JSON header {name: {dtype, shape, data_offsets: [begin, end]}} padded
with spaces to 8 bytes, then the data.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from sparsify.errors import SparsifyError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
# Below glibc's largest mmap threshold (32 MiB): a freed chunk is then reused from the heap for the next one,
# where a 32 MiB chunk was fresh pages every time (page-faulted on the read into it). Measured converting a
# 1.2 GiB checkpoint: peak RSS 635 -> 546 MiB, and faster.
CHUNK_BYTES = 8 * 2**20


@dataclass
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: Path
    offset: int      # absolute byte offset of the data in `path`
    nbytes: int


def read_header(path: Path) -> list[TensorEntry]:
    """Entries of one safetensors file; raises SparsifyError if it is corrupted or truncated."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SparsifyError(f"{path} is truncated: shorter than a safetensors header")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(size - 8, 100 * 2**20):
                raise SparsifyError(f"{path} is corrupted or truncated: header length {header_len} exceeds the file")
            header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SparsifyError(f"{path} is corrupted: its safetensors header is not valid JSON ({e})") from None
    except FileNotFoundError:
        raise SparsifyError(f"{path} does not exist") from None
    entries = []
    data_start = 8 + header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            shape = tuple(int(s) for s in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise SparsifyError(f"{path} is corrupted: bad header entry for {name!r}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise SparsifyError(f"{path} is corrupted: {name!r} has {end - begin} bytes for shape {list(shape)}")
        if data_start + end > size:
            raise SparsifyError(
                f"{path} is truncated: {name!r} ends at byte {data_start + end} but the file has {size} bytes; "
                "re-copy or re-save the checkpoint"
            )
        entries.append(TensorEntry(name, dtype, shape, path, data_start + begin, nbytes))
    return entries


def read_checkpoint_dir(directory: Path) -> dict[str, TensorEntry]:
    """All tensors of a directory holding model.safetensors, or shards listed in an index."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SparsifyError(f"{index} is corrupted ({e})") from None
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise SparsifyError(f"{directory} holds no *.safetensors weights")
    entries: dict[str, TensorEntry] = {}
    for file in files:
        for entry in read_header(directory / file):
            entries[entry.name] = entry
    return entries


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    out = torch.empty(entry.shape, dtype=entry.dtype)
    buffer = out.view(-1).view(torch.uint8).numpy() if entry.nbytes else b""
    with open(entry.path, "rb") as f:
        f.seek(entry.offset)
        if entry.nbytes and f.readinto(buffer) != entry.nbytes:
            raise SparsifyError(f"{entry.path} is truncated: could not read {entry.name!r}")
    return out


def iter_chunks(entry: TensorEntry, chunk_bytes: int = CHUNK_BYTES) -> Iterator[torch.Tensor]:
    """The tensor's elements, flat, in chunks of at most chunk_bytes."""
    per_chunk = max(1, chunk_bytes // entry.dtype.itemsize)
    total = math.prod(entry.shape)
    with open(entry.path, "rb") as f:
        f.seek(entry.offset)
        for start in range(0, total, per_chunk):
            chunk = torch.empty(min(per_chunk, total - start), dtype=entry.dtype)
            if f.readinto(chunk.view(torch.uint8).numpy()) != chunk.numel() * entry.dtype.itemsize:
                raise SparsifyError(f"{entry.path} is truncated: could not read {entry.name!r}")
            yield chunk


@dataclass
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: Callable[[], Iterator[torch.Tensor]]  # flat chunks, in order, of exactly `shape`'s elements
    # Where the bytes are already on disk: this source tensor's bytes, once or back to back several times (a
    # routed tensor stacks M copies of the dense one). The writer then copies them file to file inside the
    # kernel instead of reading each chunk into memory and writing it out again (see _send_copies).
    copies_of: TensorEntry | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def copies(self) -> int:
        """How many back-to-back copies of `copies_of`'s bytes this tensor is; 0 if it is not made so."""
        source = self.copies_of
        if source is None or source.dtype != self.dtype or not source.nbytes or self.nbytes % source.nbytes:
            return 0
        return self.nbytes // source.nbytes


def write_checkpoint(directory: Path, tensors: list[OutputTensor], max_shard_bytes: int,
                     progress: Callable[[int], None] | None = None) -> list[str]:
    """Write tensors as model.safetensors, or as shards plus an index when they exceed max_shard_bytes."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        _write_file(Path(directory) / name, shard, progress)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
                 "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard}}
        (Path(directory) / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return names


def _write_file(path: Path, tensors: list[OutputTensor], progress) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for t in tensors:
            if t.copies and _send_copies(t, f, progress):
                continue
            written = 0
            for chunk in t.chunks():
                chunk = chunk.to(t.dtype).contiguous()
                f.write(chunk.view(torch.uint8).numpy() if chunk.numel() else b"")
                written += chunk.numel() * t.dtype.itemsize
                if progress:
                    progress(chunk.numel() * t.dtype.itemsize)
            if written != t.nbytes:
                raise SparsifyError(f"internal: wrote {written} bytes for {t.name}, expected {t.nbytes}")
        f.flush()
        os.fsync(f.fileno())


# Per sendfile call: progress is reported this often.
COPY_CALL_BYTES = 8 * CHUNK_BYTES


def _send_copies(tensor: OutputTensor, out, progress) -> bool:
    """Append the tensor's bytes, `copies` copies of its source's, to the open file `out` with os.sendfile
    (page cache to page cache, no copy through this process's memory, as shutil.copyfile does): a conversion
    writing 3.1 GiB spent 11.4 s in read + write against 5-8 s for sendfile. False, with nothing written,
    where there is no sendfile (Windows) or the kernel refuses it for these files: the caller writes chunks."""
    if not hasattr(os, "sendfile"):
        return False
    entry = tensor.copies_of
    out.flush()
    sent_any = False
    with open(entry.path, "rb") as source:
        for _ in range(tensor.copies):
            done = 0
            while done < entry.nbytes:
                try:
                    sent = os.sendfile(out.fileno(), source.fileno(), entry.offset + done,
                                       min(COPY_CALL_BYTES, entry.nbytes - done))
                except OSError:
                    if sent_any:  # part of it went out: the file position moved with it
                        raise
                    return False
                if sent == 0:
                    raise SparsifyError(f"{entry.path} is truncated: could not read {entry.name!r}")
                sent_any = True
                done += sent
                if progress:
                    progress(sent)
    out.seek(0, os.SEEK_END)  # the buffered file learns where sendfile left the descriptor
    return True
