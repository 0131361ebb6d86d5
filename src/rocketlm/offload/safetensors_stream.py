"""A safetensors file written one tensor at a time: the header (every name, dtype and shape) is
known up front, then each tensor's bytes are appended in header order, so writing never holds
more than one tensor in memory."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from rocketlm.errors import CheckpointError

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


def _nbytes(shape, dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.tensor([], dtype=dtype).element_size()


class StreamingSafetensorsWriter:
    """``with StreamingSafetensorsWriter(path, {name: (shape, dtype)}) as w: w.write(name, tensor)`` for
    every name, in the order given."""

    def __init__(self, path: str | Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = dict(specs)
        self._order = list(self.specs)
        self._next = 0
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name in self._order:
            shape, dtype = self.specs[name]
            size = _nbytes(shape, dtype)
            header[name] = {"dtype": DTYPES[dtype], "shape": [int(d) for d in shape],
                            "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._handle = self.path.open("wb")
        self._handle.write(struct.pack("<Q", len(raw)))
        self._handle.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order) or self._order[self._next] != name:
            raise CheckpointError(f"streaming write of {name!r} out of order (expected "
                                  f"{self._order[self._next] if self._next < len(self._order) else 'nothing'})")
        shape, dtype = self.specs[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise CheckpointError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, declared {tuple(shape)} {dtype}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self._handle.write(memoryview(data.view(torch.uint8).numpy()))
        self._next += 1

    def copy_from(self, name: str, path: str | Path, start: int, end: int, chunk: int = 1 << 26) -> None:
        """Write ``name``'s bytes straight from ``path[start:end]`` (same dtype and shape as declared), in
        ``chunk``-byte pieces: a large stored tensor (an embedding) never sits in memory whole."""
        if self._next >= len(self._order) or self._order[self._next] != name:
            raise CheckpointError(f"streaming write of {name!r} out of order")
        shape, dtype = self.specs[name]
        if end - start != _nbytes(shape, dtype):
            raise CheckpointError(f"{name}: {end - start} stored bytes, declared {_nbytes(shape, dtype)}")
        with open(path, "rb", buffering=0) as source:
            source.seek(start)
            left = end - start
            while left:
                data = source.read(min(chunk, left))
                if not data:
                    raise CheckpointError(f"{path} is truncated")
                self._handle.write(data)
                left -= len(data)
        self._next += 1

    def close(self) -> None:
        self._handle.close()
        if self._next != len(self._order):
            raise CheckpointError(f"{self.path}: {len(self._order) - self._next} declared tensors were never written")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._handle.close()
            return False
        self.close()
        return False
