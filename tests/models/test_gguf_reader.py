"""Our GGUF header reader against gguf.GGUFReader on a file written by gguf.GGUFWriter: every value type,
string and numeric arrays, float and quantized tensors; damaged files give clear errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from fastinfer.models.gguf_reader import GGUFReader  # noqa: E402


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("gguf") / "t.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint8("t.u8", 7)
    w.add_int8("t.i8", -7)
    w.add_uint16("t.u16", 65000)
    w.add_int32("t.i32", -123456)
    w.add_uint64("t.u64", 2 ** 40)
    w.add_int64("t.i64", -(2 ** 40))
    w.add_float32("t.f32", 1e-6)
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo 🤖")
    w.add_array("t.strs", ["a", "", "中文", "<bos>"] * 50)
    w.add_array("t.floats", [0.5, -1.25, 3.0])
    w.add_array("t.ints", [1, -2, 3])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((4, 6)).astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((3, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("q8", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    q4k = rng.integers(0, 256, (5, 2 * 144), dtype=np.uint8)  # 5 rows of 512 (random bytes suffice here)
    w.add_tensor("q4k", q4k, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_same_fields_and_tensors_as_gguf(gguf_path):
    ours, ref = GGUFReader(gguf_path), gguf.GGUFReader(gguf_path)
    keys = {k for k in ref.fields if not k.startswith("GGUF.")}  # gguf's pseudo-fields (version, counts)
    assert set(ours.fields) == keys
    for k in keys:
        assert ours.fields[k] == ref.fields[k].contents(), k
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert a.tensor_type == b.tensor_type and a.shape == [int(x) for x in b.shape], a.name
        assert (a.data_offset, a.n_bytes) == (int(b.data_offset), int(b.n_bytes)), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(a.data, b.data), a.name


def test_damaged_files_are_clear_errors(gguf_path, tmp_path):
    raw = Path(gguf_path).read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + raw[4:])
    with pytest.raises(ValueError, match="no GGUF magic"):
        GGUFReader(str(bad))
    bad.write_bytes(raw[:200])
    with pytest.raises(ValueError, match="truncated GGUF header"):
        GGUFReader(str(bad))
    bad.write_bytes(raw[:4] + (7).to_bytes(4, "little") + raw[8:])
    with pytest.raises(ValueError, match="GGUF version 7"):
        GGUFReader(str(bad))
    bad.write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        GGUFReader(str(bad))
