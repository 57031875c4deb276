"""One engine step of a tiny model on device ``cuda``, proven on a CPU-only machine: under ``FakeTensorMode`` the
model, its KV cache and the step's inputs are fake CUDA tensors, and any op that mixes in a CPU tensor raises.
The step runs the forward, the logits, sampling (greedy, seeded and unseeded top-k / top-p / min-p, penalties,
logprobs) and batched verification of n-gram drafts: everything before the step's one device-to-host copy."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode

from fastinfer.config import ModelConfig, SpeculativeConfig
from fastinfer.core.outputs import NewRequestData, SchedulerOutput
from fastinfer.models.interface import allocate_kv_caches, build_model
from fastinfer.ops import OpSet
from fastinfer.sampling_params import SamplingParams
from fastinfer.worker.model_runner import ModelRunner
from fastinfer.worker.spec_decode import NgramProposer, Speculator

CUDA = torch.device("cuda", 0)
CFG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=512, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=128, sliding_window=None)
BS = 8
PARAMS = [SamplingParams(temperature=0, max_tokens=16),
          SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, seed=3, max_tokens=16, logprobs=2,
                         repetition_penalty=1.2, frequency_penalty=0.1, min_tokens=2),
          SamplingParams(temperature=1.0, max_tokens=16)]
PROMPTS = [[1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3], [7, 8, 9, 10, 11], list(range(20, 33))]


def _runner(backend: str | None) -> ModelRunner:
    ops = OpSet("cuda", backend)
    model = build_model(CFG, ops, torch.float32, CUDA)
    kv = allocate_kv_caches(model.kv_cache_spec(), 16, BS, torch.float32, CUDA)
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=3, disable_by_batch_size=8)
    return ModelRunner(model, kv, BS, ops, CUDA, None, Speculator(spec, NgramProposer(4, 2), 128))


def _prefill() -> SchedulerOutput:
    blocks = [([0, 1],), ([2],), ([3, 4],)]  # one KV cache group
    new = [NewRequestData(f"r{i}", p, [], sp, 0, (2,), None) for i, (p, sp) in enumerate(zip(PROMPTS, PARAMS))]
    return SchedulerOutput(req_ids=[n.req_id for n in new], num_scheduled_tokens=[len(p) for p in PROMPTS],
                           num_computed_tokens=[0, 0, 0], block_ids=blocks, new_reqs=new)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif obj is not None and hasattr(obj, "__dataclass_fields__"):
        for name in obj.__dataclass_fields__:
            yield from _tensors(getattr(obj, name))


def _assert_on_cuda(dev_out) -> None:
    found = list(_tensors(dev_out))
    assert found
    assert all(t.device.type == "cuda" for t in found), [t.device for t in found]


@pytest.mark.parametrize("backend", [None, "torch"])  # the resolved CUDA op set (Triton ops), and plain torch
def test_one_step_runs_on_cuda_under_fake_tensors(backend):
    with FakeTensorMode(allow_non_fake_inputs=False):
        runner = _runner(backend)
        assert all(t.device.type == "cuda" for t in [*runner.model.parameters(), *runner.model.buffers()])
        assert all(k.device.type == "cuda" and v.device.type == "cuda" for k, v in runner.kv_caches)
        step = runner.prepare(_prefill())
        assert step.packed.input_ids.device.type == "cuda" and step.packed.meta.slot_mapping.device.type == "cuda"
        dev = runner.run(step)
        _assert_on_cuda(dev)
        assert dev.sampled is not None and dev.sampled.logprob is not None  # the logprobs path ran
        # the host part of the step would sync here; give every request a sampled token by hand, then the
        # n-gram proposer drafts for request 0 (its prompt repeats) and the next step verifies the drafts
        for st, tok in zip(step.states, [4, 12, 33]):
            st.append_output_tokens([tok])
        drafts = runner.speculator.propose(step.states, [([0, 1],), ([2],), ([3, 4],)], 3)
        assert drafts and "r0" in drafts
        sched = SchedulerOutput(req_ids=["r0", "r1", "r2"], num_computed_tokens=[len(p) for p in PROMPTS],
                                num_scheduled_tokens=[1 + len(drafts.get(f"r{i}", [])) for i in range(3)],
                                block_ids=[([0, 1],), ([2, 5],), ([3, 4],)], spec_token_ids=drafts)
        dev = runner.run(runner.prepare(sched))
        _assert_on_cuda(dev)
        assert dev.verified is not None


def test_a_cpu_tensor_planted_in_the_forward_is_caught():
    with FakeTensorMode(allow_non_fake_inputs=False):
        runner = _runner("torch")
        rotary = runner.model.rotary
        rotary.cos_sin_cache = torch.zeros_like(rotary.cos_sin_cache, device="cpu")  # one buffer left on the CPU
        step = runner.prepare(_prefill())
        with pytest.raises(FakeTensorDeviceMismatchError, match="cpu"):
            runner.run(step)


def test_a_cpu_tensor_planted_in_sampling_is_caught(monkeypatch):
    import fastinfer.worker.sampler as sampler

    with FakeTensorMode(allow_non_fake_inputs=False):
        runner = _runner("torch")
        step = runner.prepare(_prefill())
        monkeypatch.setattr(sampler, "_upload", lambda data, dtype, device: torch.tensor(data, dtype=dtype))
        with pytest.raises(FakeTensorDeviceMismatchError, match="cpu"):
            runner.run(step)
