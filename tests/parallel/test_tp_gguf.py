"""A GGUF file under tensor parallelism, in-process as rank 1 of 3 on SmolLM2 (Q4_1 projections, blocks of 32):
the rank dequantizes only its rows (column-parallel q/k/v, gate/up) and whole blocks of its columns (row-parallel
o_proj, down_proj) and vocabulary rows, about a third of those bytes by the load log, and holds exactly the
slices of one process's model, dequantized or with the file's codes kept (``quantization="gguf"``). The 3-rank
engine's tokens are tested in test_tp_smollm2.py. A GGUF MoE file's experts, stacked or per expert, split too."""
from __future__ import annotations

import logging
import re

import torch

from fastinfer.models.loader import load_model
from tests.models import test_moe_models
from tests.models.test_gguf_moe import _expert_types, write_gguf
from tests.parallel.test_sharding import as_rank

moe_dir = test_moe_models.moe_dir  # its fixture: family -> (HF directory, HF model)

# SmolLM2: 9 query heads and 3 KV heads of 64, hidden 576, intermediate 1536; rank 1 of 3
Q, KV, OUT, D = slice(192, 384), slice(64, 128), slice(192, 384), slice(512, 1024)


def _read_fraction(caplog) -> float:
    msgs = [r.getMessage() for r in caplog.records if "of the split weights" in r.getMessage()]
    assert len(msgs) == 1, msgs
    m = re.search(r"rank 1 of 3 read [\d.]+ of [\d.]+ MiB of the split weights \(([\d.]+)\)", msgs[0])
    assert m, msgs[0]
    return float(m[1])


def _state(path, **kw):
    return load_model(path, "float32", progress=False, **kw).model.state_dict()


def test_rank_dequantizes_only_its_gguf_slices(smollm2_path, caplog):
    full = _state(smollm2_path)
    with as_rank(1, 3), caplog.at_level(logging.INFO, logger="fastinfer"):
        part = _state(smollm2_path)
    assert abs(_read_fraction(caplog) - 1 / 3) < 0.01
    qkv = full["layers.0.self_attn.qkv_proj.weight"]  # q 576 rows, k 192, v 192
    want = torch.cat([qkv[Q], qkv[576:768][KV], qkv[768:960][KV]])
    assert torch.equal(part["layers.0.self_attn.qkv_proj.weight"], want)
    gu = full["layers.1.mlp.gate_up_proj.weight"]
    assert torch.equal(part["layers.1.mlp.gate_up_proj.weight"], torch.cat([gu[D], gu[1536:][D]]))
    assert torch.equal(part["layers.1.self_attn.o_proj.weight"], full["layers.1.self_attn.o_proj.weight"][:, OUT])
    assert torch.equal(part["layers.1.mlp.down_proj.weight"], full["layers.1.mlp.down_proj.weight"][:, D])
    assert torch.equal(part["embed_tokens.weight"], full["embed_tokens.weight"][16384:32768])


def test_rank_keeps_only_its_gguf_codes(smollm2_path, caplog):
    full = _state(smollm2_path, quantization="gguf")
    with as_rank(1, 3), caplog.at_level(logging.INFO, logger="fastinfer"):
        part = _state(smollm2_path, quantization="gguf")
    assert abs(_read_fraction(caplog) - 1 / 3) < 0.01
    for name in ("qweight", "scales", "mins"):  # int4 g32: 2 codes a byte, one scale / min per 32 columns
        o = full[f"layers.1.self_attn.o_proj.{name}"]
        cols = slice(OUT.start // 2, OUT.stop // 2) if name == "qweight" else slice(OUT.start // 32, OUT.stop // 32)
        assert torch.equal(part[f"layers.1.self_attn.o_proj.{name}"], o[:, cols])
        q = full[f"layers.0.self_attn.qkv_proj.{name}"]
        assert torch.equal(part[f"layers.0.self_attn.qkv_proj.{name}"][:192], q[Q])


def test_rank_keeps_only_its_gguf_expert_slices(moe_dir, tmp_path):
    """A GGUF MoE file (Q4 / Q8 experts, I = 64) on rank 1 of 2, the codes kept: stacked ``ffn_*_exps`` and the
    older per-expert tensors give this rank's rows of both w13 halves and columns of w2, one process's codes."""
    path, hf = moe_dir("qwen3_moe_i64")
    for per_expert in (False, True):
        g = write_gguf(tmp_path / f"m{per_expert}.gguf", hf, "qwen3moe", types=_expert_types, per_expert=per_expert)
        full = load_model(g, "float32", tokenizer=path, quantization="gguf", progress=False).model
        with as_rank(1, 2):
            part = load_model(g, "float32", tokenizer=path, quantization="gguf", progress=False).model
        for fb, pb in zip(full.moe_layers(), part.moe_layers(), strict=True):
            f13, f2 = fb.experts.w13.quant.dequantize(), fb.experts.w2.quant.dequantize()
            assert torch.equal(pb.experts.w13.quant.dequantize(), torch.cat([f13[:, 32:64], f13[:, 96:128]], 1))
            assert torch.equal(pb.experts.w2.quant.dequantize(), f2[:, :, 32:64])
