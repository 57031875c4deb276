"""The sharding rules without processes: divisibility errors naming the valid sizes, head and vocabulary
placement, quantized weights narrowed on group boundaries equal to the dequantized slices, a rank's model
built in-process (no collective runs while loading) holding exactly its slices, and the step plan's JSON
round trip."""
from __future__ import annotations

import contextlib

import pytest
import torch

from fastinfer.core.outputs import NewRequestData, SchedulerOutput
from fastinfer.core.serialization import decode_scheduler_output, encode_scheduler_output
from fastinfer.distributed import parallel_state
from fastinfer.distributed.sharding import divide, head_shard, narrow, vocab_shard
from fastinfer.models.loader import load_model
from fastinfer.quantization.rtn import quantize_int4, quantize_int8
from fastinfer.sampling_params import SamplingParams, StructuredOutputsParams


@contextlib.contextmanager
def as_rank(rank: int, size: int):
    parallel_state.set_tensor_parallel(rank, size)
    try:
        yield
    finally:
        parallel_state.set_tensor_parallel(0, 1)


def test_sizes_that_do_not_divide_name_the_valid_ones():
    with pytest.raises(ValueError, match="tensor_parallel_size=4 does not divide num_attention_heads=9; valid "
                                         "sizes: 1, 3, 9"):
        head_shard(9, 3, 0, 4)
    with pytest.raises(ValueError, match="tensor_parallel_size=6 does not divide intermediate_size=64; valid sizes: "
                                         "1, 2, 4, 8, 16, 32, 64"):
        divide(64, 6, "intermediate_size")
    with pytest.raises(ValueError, match="neither divides num_key_value_heads=3 nor is a multiple of it; valid "
                                         "sizes: 1, 3, 6"):
        head_shard(12, 3, 0, 2)
    with pytest.raises(ValueError, match="leaves a rank without vocabulary rows"):
        vocab_shard(5, 0, 4)


def test_heads_split_or_replicated_and_vocabulary_rows():
    assert [head_shard(9, 3, r, 3) for r in range(3)] == [head_shard(9, 3, 0, 1).__class__(3, 1, 3 * r, r)
                                                          for r in range(3)]
    # 4 ranks, 2 KV heads: each KV head on 2 ranks, and each rank's query heads read their own KV head
    for r in range(4):
        s = head_shard(8, 2, r, 4)
        assert (s.num_heads, s.num_kv_heads) == (2, 1)
        assert {h // (8 // 2) for h in range(s.q_start, s.q_start + s.num_heads)} == {s.kv_start}
    rows = [vocab_shard(257, r, 2) for r in range(2)]
    assert rows == [(0, 129, 129), (129, 128, 129)]


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_narrow_equals_the_dequantized_slice(bits):
    w = torch.randn(12, 96)
    qw = quantize_int4(w, 32) if bits == 4 else quantize_int8(w, 32)
    full = qw.dequantize()
    assert torch.equal(narrow(qw, 0, 4, 4).dequantize(), full[4:8])
    assert torch.equal(narrow(qw, 1, 32, 64).dequantize(), full[:, 32:96])
    with pytest.raises(ValueError, match="not a multiple of the quantization group size 32"):
        narrow(qw, 1, 16, 48)


def test_rank_loads_only_its_slices(tiny_model_dir):
    path = tiny_model_dir("llama")
    full = load_model(path, "float32", progress=False).model.state_dict()
    for rank in (1,):  # the last rank: every offset non-zero
        with as_rank(rank, 2):
            part = load_model(path, "float32", progress=False).model.state_dict()
        q = full["layers.0.self_attn.qkv_proj.weight"]  # 4 query heads, 2 KV heads of 16: q 64 rows, k 32, v 32
        want = torch.cat([q[32 * rank:32 * rank + 32], q[64 + 16 * rank:80 + 16 * rank],
                          q[96 + 16 * rank:112 + 16 * rank]])
        assert torch.equal(part["layers.0.self_attn.qkv_proj.weight"], want)
        o, d = full["layers.1.self_attn.o_proj.weight"], full["layers.1.mlp.down_proj.weight"]
        assert torch.equal(part["layers.1.self_attn.o_proj.weight"], o[:, 32 * rank:32 * rank + 32])
        assert torch.equal(part["layers.1.mlp.down_proj.weight"], d[:, 64 * rank:64 * rank + 64])
        v = full["embed_tokens.weight"].shape[0] // 2
        assert torch.equal(part["embed_tokens.weight"], full["embed_tokens.weight"][v * rank:v * rank + v])
        assert torch.equal(part["lm_head.weight"], full["lm_head.weight"][v * rank:v * rank + v])
        assert torch.equal(part["norm.weight"], full["norm.weight"])


def test_row_parallel_group_size_error(tiny_model_dir):
    with as_rank(0, 2), pytest.raises(ValueError, match="splits K=64 into 32 columns, not a multiple of the "
                                                          "quantization group size 64; valid sizes: 1 "):
        load_model(tiny_model_dir("llama"), "float32", progress=False, quantization="int4")


def test_unsupported_family_is_a_clear_error(tiny_model_dir):
    with as_rank(0, 2), pytest.raises(ValueError, match="tensor parallelism is not supported for "
                                                          "LlamaForCausalLM|generic path"):
        load_model(tiny_model_dir("llama"), "float32", progress=False, model_impl="transformers")


def test_step_plan_json_round_trip():
    so = StructuredOutputsParams(json={"type": "object"})
    sp = SamplingParams(temperature=0.7, seed=5, stop=["\n"], logit_bias={3: 1.5}, bad_words=["x"],
                        bad_words_token_ids=[[7, 8]], structured_outputs=so)
    s = SchedulerOutput(["a", "b"], [5, 1], [0, 9], [([1, 2],), ([3],)],
                        [NewRequestData("a", [1, 2, 3, 4, 5], [], sp, 0, (2,), "salt")], {"b": [4, 5]}, ["c"],
                        ["d"], [(0, 1, 2)])
    data = encode_scheduler_output(s)
    assert b"pickle" not in data and data.startswith(b"{")
    assert decode_scheduler_output(data) == s
