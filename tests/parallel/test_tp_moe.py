"""Mixture-of-Experts under tensor parallelism: each rank holds its slice of every expert's intermediate size
(rows of the gate and up halves of w13, columns of w2) from per-expert and transformers-5 stacked checkpoint
tensors alike (in-process, exact slices), quantized w2 split on group boundaries (a clear error otherwise), and
on 2 spawned CPU ranks greedy tokens identical to one process: Qwen2-MoE fp32 (shared expert reduced with the
experts, a dense layer, q/k/v bias) and Mixtral with int4 experts."""
from __future__ import annotations

import functools

import pytest
import torch
import transformers

from fastinfer import LLM
from fastinfer.models.loader import load_model
from tests.conftest import save_tiny_model
from tests.parallel.test_sharding import as_rank
from tests.parallel.test_tp_llama import PROMPTS, _greedy

COMMON = dict(vocab_size=49152, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, bos_token_id=1, eos_token_id=2, num_experts_per_tok=2)


def _config(family: str, inter: int) -> transformers.PretrainedConfig:
    if family == "mixtral":
        return transformers.MixtralConfig(**COMMON, intermediate_size=inter, num_local_experts=8)
    return transformers.Qwen2MoeConfig(**COMMON, intermediate_size=128, moe_intermediate_size=inter, num_experts=8,
                                       shared_expert_intermediate_size=96, norm_topk_prob=False, mlp_only_layers=[1])


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory, smollm2_tokenizer_dir):
    """(family, expert intermediate size) -> (directory of a tiny random HF model, its in-memory state dict: the
    experts stacked as transformers 5 holds them)."""

    @functools.cache
    def make(family: str, inter: int = 64):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(_config(family, inter)).float()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("gate.weight") and p.shape[0] == 8:  # the router: no near-ties
                    p.normal_(0, 0.5)
                elif p.dim() >= 2:
                    p.normal_(0, 0.08)
                elif name.endswith("bias"):
                    p.normal_(0, 0.05)
        d = save_tiny_model(model, tmp_path_factory.mktemp(f"tp-moe-{family}"), smollm2_tokenizer_dir)
        return d, model.state_dict()

    return make


def _experts(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(b.experts.w13.weight.data.clone(), b.experts.w2.weight.data.clone()) for b in model.moe_layers()]


def test_rank_holds_its_expert_slices_from_per_expert_and_stacked_tensors(moe_model):
    path, stacked = moe_model("qwen2_moe")
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in stacked)
    full = _experts(load_model(path, "float32", progress=False).model)
    with as_rank(1, 2):
        model = load_model(path, "float32", progress=False).model
        from_disk = _experts(model)  # per-expert tensors
        for b in model.moe_layers():
            b.experts.w13.weight.data.zero_()
            b.experts.w2.weight.data.zero_()
        model.load_weights(stacked.items())
    for (w13, w2), part, other in zip(full, from_disk, _experts(model)):
        want13 = torch.cat([w13[:, 32:64], w13[:, 96:128]], dim=1)  # rank 1's rows of gate, then of up
        assert torch.equal(part[0], want13) and torch.equal(part[1], w2[:, :, 32:64])
        assert torch.equal(other[0], part[0]) and torch.equal(other[1], part[1])


def test_quantized_experts_split_on_group_boundaries_or_name_the_valid_sizes(moe_model):
    path, _ = moe_model("mixtral", 32)
    with as_rank(0, 2), pytest.raises(ValueError, match="splits K=32 into 16 columns, not a multiple of the "
                                                          "quantization group size 32; valid sizes: 1 "):
        load_model(path, "float32", progress=False, quantization="int4-g32")


def _llm(path: str, **kw) -> LLM:
    return LLM(path, dtype="float32", load_progress=False, max_model_len=128, max_num_seqs=4, **kw)


def test_tp2_qwen2_moe_equals_tp1(moe_model):
    path, _ = moe_model("qwen2_moe")
    ref, _ = _greedy(_llm(path), PROMPTS)
    got, llm = _greedy(_llm(path, tensor_parallel_size=2), PROMPTS)
    assert got == ref
    llm.shutdown()


def test_tp2_int4_experts_equal_int4_tp1(moe_model):
    path, _ = moe_model("mixtral")
    ref, _ = _greedy(_llm(path, quantization="int4-g32"), PROMPTS)
    got, llm = _greedy(_llm(path, quantization="int4-g32", tensor_parallel_size=2), PROMPTS)
    assert got == ref
    llm.shutdown()
