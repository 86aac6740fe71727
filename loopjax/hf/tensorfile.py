"""safetensors files read and written one tensor at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
[start, end) byte offsets into the data that follows) and the raw little-endian data. A sharded
checkpoint adds `model.safetensors.index.json` (name -> file). The `safetensors` package reads whole
files (and its numpy reader has no bfloat16) and writes from a dict already in memory; import and export
must hold at most one tensor at a time, so this module reads and writes the format itself. Every header
is checked against its file's size before anything is read, so a truncated file fails at once, by name.
"""

import dataclasses
import json
import os
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

from loopjax.hf.errors import HFError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32)}
CODES = {dtype: code for code, dtype in DTYPES.items()}
_ALIGN = 8  # the header is padded with spaces to a multiple of 8 bytes, as the safetensors library does
FIX_DOWNLOAD = "download or copy the checkpoint again"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  file: str
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int  # of the first byte, from the start of the file

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def read_header(path: str) -> dict[str, TensorInfo]:
  """The tensors of one safetensors file, checked against its size; HFError naming the file otherwise."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    length = struct.unpack("<Q", raw)[0] if len(raw) == 8 else size
    if 8 + length > size:
      raise HFError(f"{path} is truncated or not a safetensors file (its header needs {8 + length} bytes, the "
                    f"file has {size}). Fix: {FIX_DOWNLOAD}")
    try:
      header = json.loads(f.read(length))
    except ValueError as e:
      raise HFError(f"{path} has a damaged safetensors header ({e}). Fix: {FIX_DOWNLOAD}") from None
  tensors = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    if entry["dtype"] not in DTYPES:
      raise HFError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which loopjax does not read. Fix: "
                    f"convert the checkpoint to one of {', '.join(DTYPES)}")
    start, end = entry["data_offsets"]
    info = TensorInfo(path, DTYPES[entry["dtype"]], tuple(entry["shape"]), 8 + length + start)
    if end - start != info.nbytes or info.offset + info.nbytes > size:
      raise HFError(f"{path} is truncated: tensor {name!r} needs bytes up to {8 + length + end}, the file has "
                    f"{size}. Fix: {FIX_DOWNLOAD}")
    tensors[name] = info
  return tensors


class TensorDir(Mapping):
  """The tensors of an HF directory (one model.safetensors, or shards listed by the index), read on access.

  Opening it reads and checks every header; `tensors[name]` reads that one tensor from disk.
  """

  def __init__(self, path: str):
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
      files = sorted(set(_read_index(index).values()))
    elif os.path.isfile(os.path.join(path, SINGLE)):
      files = [SINGLE]
    else:
      files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
      if not files:
        raise HFError(f"no {SINGLE}, {INDEX} or *.safetensors file in {path}. Fix: give the directory of an HF "
                      "checkpoint (config.json and its safetensors files)")
    self.infos = {}
    for name in files:
      file = os.path.join(path, name)
      if not os.path.isfile(file):
        raise HFError(f"{index} lists {name}, which is missing. Fix: {FIX_DOWNLOAD}")
      self.infos.update(read_header(file))

  def __getitem__(self, name: str) -> np.ndarray:
    info = self.infos[name]
    count = int(np.prod(info.shape, dtype=np.int64))
    return np.fromfile(info.file, dtype=info.dtype, count=count, offset=info.offset).reshape(info.shape)

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {name: info.shape for name, info in self.infos.items()}

  def __iter__(self):
    return iter(self.infos)

  def __len__(self) -> int:
    return len(self.infos)


def _read_index(path: str) -> dict[str, str]:
  try:
    with open(path) as f:
      return json.load(f)["weight_map"]
  except (ValueError, KeyError) as e:
    raise HFError(f"{path} is not a safetensors index ({type(e).__name__}: {e}). Fix: {FIX_DOWNLOAD}") from None


@dataclasses.dataclass(frozen=True)
class Entry:
  """One tensor to write: its name, dtype and shape (the data comes later, in order)."""
  name: str
  dtype: np.dtype
  shape: tuple[int, ...]

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def split_files(entries: list[Entry], max_bytes: int) -> dict[str, list[Entry]]:
  """File name -> its entries, in order: one model.safetensors, or HF-named shards of <= max_bytes each
  (a tensor larger than that gets a shard of its own)."""
  groups, size = [[]], 0
  for e in entries:
    if groups[-1] and size + e.nbytes > max_bytes:
      groups.append([])
      size = 0
    groups[-1].append(e)
    size += e.nbytes
  if len(groups) == 1:
    return {SINGLE: groups[0]}
  n = len(groups)
  return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups)}


def write_index(path: str, files: dict[str, list[Entry]]):
  """model.safetensors.index.json for sharded `files`: the total size and which file holds each tensor."""
  index = {"metadata": {"total_size": sum(e.nbytes for group in files.values() for e in group)},
           "weight_map": {e.name: file for file, group in files.items() for e in group}}
  with open(path, "w") as f:
    json.dump(index, f, indent=2)


def write_file(path: str, entries: list[Entry], arrays: Iterator[np.ndarray]):
  """Writes `entries` to `path`, taking each one's data from `arrays` (in order) and writing it at once."""
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for e in entries:
    header[e.name] = {"dtype": CODES[np.dtype(e.dtype)], "shape": list(e.shape),
                      "data_offsets": [offset, offset + e.nbytes]}
    offset += e.nbytes
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % _ALIGN)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text)
    for e in entries:
      array = next(arrays)
      if array.shape != e.shape or array.dtype != e.dtype:
        raise ValueError(f"{e.name}: got {array.shape} {array.dtype}, planned {e.shape} {e.dtype}")
      f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))  # raw bytes, bfloat16 included
