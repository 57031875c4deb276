"""A fast reader of GGUF headers: metadata as plain Python values, tensor infos with memory-mapped data.

``gguf.GGUFReader`` builds numpy views for every element of every metadata array; for a 262k-token vocabulary
(Gemma 3) that took 47 s here. This reader parses the same header (GGUF v2 / v3, little-endian) with
``struct`` and ``numpy.frombuffer``: string arrays in one Python loop, numeric arrays in one call. Tensor
``data`` is a read-only ``numpy.memmap`` view shaped like ``gguf.ReaderTensor.data`` (float arrays in torch
order, quantized types as uint8 [..., bytes per row]), so the same decoders read both.
"""
from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastinfer.distributed.sharding import LazyTensor

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}
_STRING, _ARRAY = 8, 9
_FLOAT_TYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                "I32": np.int32, "I64": np.int64}


@dataclass
class TensorInfo:
    """What the loader reads of one tensor (the fields of ``gguf.ReaderTensor`` it uses)."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: list[int]  # GGUF order: innermost (row length) first
    data_offset: int  # absolute, in bytes
    n_bytes: int
    data: np.ndarray


class _Cursor:
    def __init__(self, buf: Any) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str) -> Any:
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.unpack("<Q")
        s = bytes(self.buf[self.pos:self.pos + n])
        if len(s) != n:
            raise struct.error("string past the end of the file")
        self.pos += n
        return s.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if etype == _STRING:
                return [self.string() for _ in range(count)]
            if etype in _NUMPY:
                dt = np.dtype(_NUMPY[etype])
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
                self.pos += count * dt.itemsize
                return arr.tolist()
            return [self.value(etype) for _ in range(count)]  # arrays of arrays
        if vtype not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {vtype}")
        return self.unpack(_SCALARS[vtype])


class GGUFReader:
    """``fields``: key -> Python value (str, int, float, bool or list); ``tensors``: :class:`TensorInfo`s in file
    order. Raises ValueError on anything that is not a readable little-endian GGUF v2/v3 file."""

    def __init__(self, path: str) -> None:
        import gguf

        with open(path, "rb") as fh:
            try:
                buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError as e:  # an empty file
                raise ValueError("empty file") from e
        try:
            c = _Cursor(buf)
            if bytes(buf[:4]) != b"GGUF":
                raise ValueError("no GGUF magic")
            c.pos = 4
            version = c.unpack("<I")
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} (big-endian or unsupported; v2 and v3 are read)")
            n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
            self.fields: dict[str, Any] = {}
            for _ in range(n_kv):
                key = c.string()
                self.fields[key] = c.value(c.unpack("<I"))
            infos = []
            for _ in range(n_tensors):
                name = c.string()
                dims = [c.unpack("<Q") for _ in range(c.unpack("<I"))]
                infos.append((name, dims, c.unpack("<I"), c.unpack("<Q")))
        except struct.error as e:
            raise ValueError(f"truncated GGUF header ({e})") from e
        finally:
            buf.close()
        align = int(self.fields.get("general.alignment", 32))
        start = -(-c.pos // align) * align
        data = np.memmap(path, dtype=np.uint8, mode="r")
        self.tensors = [self._tensor(gguf, data, name, dims, kind, start + off) for name, dims, kind, off in infos]

    @staticmethod
    def _tensor(gguf: Any, data: np.ndarray, name: str, dims: list[int], kind: int, offset: int) -> TensorInfo:
        try:
            qtype = gguf.GGMLQuantizationType(kind)
        except ValueError as e:
            raise ValueError(f"tensor {name!r} has unknown GGML type {kind}") from e
        shape = [int(d) for d in reversed(dims)]  # torch order
        if qtype.name in _FLOAT_TYPES:
            dt = np.dtype(_FLOAT_TYPES[qtype.name])
            n_bytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            arr = data[offset:offset + n_bytes].view(dt)
        else:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            if shape[-1] % block:
                raise ValueError(f"tensor {name!r}: row of {shape[-1]} is not a multiple of {qtype.name}'s block "
                                 f"({block})")
            shape = [*shape[:-1], shape[-1] // block * size]
            n_bytes = int(np.prod(shape, dtype=np.int64))
            arr = data[offset:offset + n_bytes]
        if arr.nbytes == n_bytes:
            arr = arr.reshape(shape)
        return TensorInfo(name, qtype, dims, offset, n_bytes, arr)


class GGUFSlice(LazyTensor):
    """A region of a 2-D GGUF tensor [N, K] (torch order), read only when :meth:`tensor` is called: rows are a
    contiguous byte range of whole blocks, columns (on block boundaries: 32 or 256 elements for the quantized
    types, ValueError otherwise) whole blocks of each row. ``convert`` turns the region (a :class:`TensorInfo`
    of its own shape, its data a view of the file) into what the loader yields (dequantized, or the codes kept);
    ``counter[0]`` adds up the source bytes read."""

    def __init__(self, info: TensorInfo, convert: Callable[[TensorInfo], Any], counter: list[int],
                 rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> None:
        self.info, self.convert, self.counter = info, convert, counter
        self.rows = rows or (0, int(info.shape[1]))
        self.cols = cols or (0, int(info.shape[0]))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.rows[1] - self.rows[0], self.cols[1] - self.cols[0]

    def narrow(self, dim: int, start: int, size: int) -> GGUFSlice:
        dim %= 2
        lo = (self.rows, self.cols)[dim][0] + start
        block = self._block()[0]
        if dim == 1 and (lo % block or size % block):
            raise ValueError(f"GGUF tensor {self.info.name!r}: columns {lo}..{lo + size} are not on "
                             f"{self.info.tensor_type.name}'s block boundaries ({block} elements); use a "
                             f"tensor_parallel_size that splits K into multiples of {block}")
        part = (lo, lo + size)
        return GGUFSlice(self.info, self.convert, self.counter, part if dim == 0 else self.rows,
                         part if dim == 1 else self.cols)

    def _block(self) -> tuple[int, int]:
        import gguf

        return gguf.GGML_QUANT_SIZES[self.info.tensor_type]  # (elements, bytes) per block

    def tensor(self) -> Any:
        (r0, r1), (c0, c1) = self.rows, self.cols
        data = self.info.data
        if data.dtype == np.uint8:  # raw blocks: [N, bytes per row]
            block, nbytes = self._block()
            data = data[r0:r1, c0 // block * nbytes:c1 // block * nbytes]
        else:  # a typed float view: [N, K]
            data = data[r0:r1, c0:c1]
        self.counter[0] += int(data.nbytes)
        return self.convert(TensorInfo(self.info.name, self.info.tensor_type, [c1 - c0, r1 - r0],
                                       self.info.data_offset, int(data.nbytes), data))
