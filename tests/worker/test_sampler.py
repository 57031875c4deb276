"""Sampler: filters keep exactly the right tokens, sampling follows the distribution, penalties are exact,
seeded rows do not depend on batch mates, random numbers are counter-based, and nothing syncs with the device
(checked under fake CUDA tensors)."""
from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    FakeTensorDeviceMismatchError,
    FakeTensorMode,
)

from fastinfer.core.request import Request
from fastinfer.sampling_params import SamplingParams
from fastinfer.worker import sampler
from fastinfer.worker.sampler import (
    SAMPLE_STREAM,
    VERIFY_STREAM,
    apply_penalties,
    filtered_probs,
    mix_seed,
    sample,
    uniform_noise,
)

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
M64 = (1 << 64) - 1


def _req(rid="r", outputs=(), prompt=(9,), eos=(), index=0, **kw):
    r = Request(rid, list(prompt), SamplingParams(**kw), eos_token_ids=eos, sample_index=index)
    for t in outputs:
        r.append_output_token(t)
    return r


def _tokens(logits, reqs, generator=None) -> list[int]:
    return sample(logits, reqs, generator).to_lists().token_ids


def _draw(params: dict, n=4000, logits=None) -> torch.Tensor:
    """Token counts over ``n`` independent draws of one row."""
    logits = PROBS.log() if logits is None else logits
    reqs = [_req(f"r{i}", seed=i, **params) for i in range(n)]
    toks = sample(logits.expand(n, -1).clone(), reqs).token_ids
    return torch.bincount(toks, minlength=logits.numel())


@pytest.mark.parametrize("params,allowed", [
    ({"top_k": 1}, {0}), ({"top_k": 2}, {0, 1}), ({"top_k": 3}, {0, 1, 2}),
    ({"top_p": 0.5}, {0}), ({"top_p": 0.8}, {0, 1}), ({"top_p": 0.81}, {0, 1, 2}),
    ({"min_p": 0.5}, {0, 1}), ({"min_p": 0.2}, {0, 1, 2}),
    ({"top_k": 3, "top_p": 0.6}, {0, 1}),
])
def test_filters_keep_exactly_the_allowed_set(params, allowed):
    counts = _draw({"temperature": 1.0, **params})
    assert {i for i, c in enumerate(counts.tolist()) if c} == allowed


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_sampling_follows_the_tempered_distribution(temperature):
    n = 20000
    counts = _draw({"temperature": temperature}, n=n).double()
    p = PROBS.double() ** (1 / temperature)
    p /= p.sum()
    chi2 = (((counts - n * p) ** 2) / (n * p)).sum().item()
    assert chi2 < 16.3  # 3 dof, p = 0.001


def test_unseeded_rows_follow_the_distribution_and_the_generator():
    n = 20000
    reqs = [_req(f"u{i}") for i in range(n)]
    logits = PROBS.log().expand(n, -1).clone()
    g = torch.Generator().manual_seed(7)
    counts = torch.bincount(sample(logits, reqs, g).token_ids, minlength=4).double()
    chi2 = (((counts - n * PROBS.double()) ** 2) / (n * PROBS.double())).sum().item()
    assert chi2 < 16.3
    first = _tokens(logits[:50], reqs[:50], torch.Generator().manual_seed(3))
    assert first == _tokens(logits[:50], reqs[:50], torch.Generator().manual_seed(3))  # the generator decides
    assert first != _tokens(logits[:50], reqs[:50], torch.Generator().manual_seed(4))
    torch.manual_seed(5)
    default = _tokens(logits[:50], reqs[:50])  # no generator: the device's default one
    torch.manual_seed(5)
    assert default == _tokens(logits[:50], reqs[:50])


def test_greedy_is_argmax_and_ignores_seed():
    logits = torch.randn(3, 50)
    reqs = [_req(f"g{i}", temperature=0, seed=i) for i in range(3)]
    assert _tokens(logits, reqs) == logits.argmax(-1).tolist()


def test_seeded_rows_do_not_depend_on_batch_mates():
    torch.manual_seed(0)
    logits = torch.randn(6, 1000)
    reqs = [_req(f"s{i}", temperature=1.0, seed=100 + i, top_p=0.9) for i in range(6)]
    full = _tokens(logits, reqs)
    alone = [_tokens(logits[i:i + 1], [reqs[i]])[0] for i in range(6)]
    reversed_ = _tokens(logits.flip(0), reqs[::-1])[::-1]
    assert full == alone == reversed_
    # mates that are greedy, unseeded or filtered differently change nothing either
    mates = [_req("g", temperature=0), _req("u", temperature=0.7), _req("k", top_k=5, min_p=0.1)]
    mixed = _tokens(torch.cat([logits[:3], torch.randn(3, 1000), logits[3:]]), reqs[:3] + mates + reqs[3:])
    assert mixed[:3] + mixed[6:] == full
    other_step = _req("s0", temperature=1.0, seed=100, top_p=0.9, outputs=[1, 2])
    draws = {_tokens(logits[:1], [other_step])[0] for _ in range(3)}
    assert len(draws) == 1  # deterministic per (seed, step)


def _py_uniform(seed: int, index: int, step: int, stream: int, col: int) -> float:
    """The counter-based uniform in plain Python integers: the definition every device must reproduce."""
    z = (mix_seed(seed, index, step, stream) + (col + 1) * 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    z ^= z >> 31
    return ((z >> 11) + 0.5) * 2.0 ** -53


def test_uniform_noise_is_the_integer_definition_bit_for_bit():
    seeds = [0, 1, -1, 2 ** 63 - 1, -(2 ** 63), 123456789, (1 << 70) + 5]
    rows = [(s, i, st, stream) for s in seeds for i, st, stream in [(0, 0, 0), (3, 17, 1), (1, 2 ** 40, 2)]]
    t = torch.tensor([[sampler._i64(s), i, st, stream] for s, i, st, stream in rows], dtype=torch.int64)
    u = uniform_noise(t[:, 0], t[:, 1], t[:, 2], t[:, 3], 5)
    expected = torch.tensor([[_py_uniform(*r, c) for c in range(5)] for r in rows], dtype=torch.float64)
    assert torch.equal(u, expected)
    assert bool(((u > 0) & (u < 1)).all())


def test_uniform_noise_rows_do_not_depend_on_the_batch():
    seeds = torch.tensor([5, 6, 7, 8, 9])
    index, step = torch.tensor([0, 1, 0, 2, 0]), torch.tensor([3, 3, 4, 0, 9])
    full = uniform_noise(seeds, index, step, SAMPLE_STREAM, 1000)
    for i in range(5):
        alone = uniform_noise(seeds[i:i + 1], index[i:i + 1], step[i:i + 1], SAMPLE_STREAM, 1000)
        assert torch.equal(alone[0], full[i])
    perm = torch.tensor([4, 2, 0, 3, 1])
    assert torch.equal(uniform_noise(seeds[perm], index[perm], step[perm], SAMPLE_STREAM, 1000), full[perm])
    ints = uniform_noise(seeds[:1], 0, 3, SAMPLE_STREAM, 1000)  # Python-int counters broadcast
    assert torch.equal(ints[0], full[0])
    assert not torch.equal(uniform_noise(seeds, index, step, VERIFY_STREAM, 1000), full)  # streams differ
    flat = full.flatten()
    assert abs(flat.mean().item() - 0.5) < 0.01 and abs(flat.var().item() - 1 / 12) < 0.005


def test_penalties_are_exact():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 3.0]])
    r = _req(outputs=[0, 0, 1], prompt=[3], repetition_penalty=2.0, frequency_penalty=0.5,
             presence_penalty=0.25)
    apply_penalties(logits, [r])
    # token 0: 2/2 - 0.5*2 - 0.25; token 1: -2*2 - 0.5 - 0.25; token 3 (prompt only): 0.5/2; others unchanged
    expected = torch.tensor([[1.0 - 1.0 - 0.25, -4.0 - 0.5 - 0.25, 1.0, 0.25, 3.0]])
    assert torch.allclose(logits, expected)


def test_penalties_batched_rows_match_one_row_at_a_time():
    torch.manual_seed(1)
    logits = torch.randn(5, 12)
    reqs = [_req("a", outputs=[0, 0, 1, 11], prompt=[3, 3], repetition_penalty=1.5, frequency_penalty=0.3),
            _req("b"),  # no penalties: untouched
            _req("c", outputs=[2, 99], presence_penalty=-0.5),  # out-of-range output id ignored
            _req("d", outputs=[5], prompt=[5, 6, 7], repetition_penalty=0.8, eos=(7,), min_tokens=4),
            _req("e", outputs=[], prompt=[1], frequency_penalty=1.0, presence_penalty=1.0)]
    batched = logits.clone()
    apply_penalties(batched, reqs)
    for i, r in enumerate(reqs):
        one = logits[i:i + 1].clone()
        apply_penalties(one, [r])
        assert torch.equal(batched[i], one[0])
    assert torch.equal(batched[1], logits[1])
    assert batched[3, 7] == float("-inf")


def test_min_tokens_bans_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 0.0, 10.0, 9.0, 1.0]])
    r = _req(eos=(2,), min_tokens=2, stop_token_ids=[3], temperature=0)
    assert _tokens(logits, [r]) == [4]
    r2 = _req(eos=(2,), min_tokens=1, temperature=0, outputs=[4])
    assert _tokens(logits, [r2]) == [2]
    r3 = _req(eos=(2,), min_tokens=2, ignore_eos=True, temperature=0)
    assert _tokens(logits, [r3]) == [2]


def test_logprobs_are_raw_log_softmax_with_ranked_alternatives():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    r = _req(temperature=0, logprobs=2, repetition_penalty=1.5, prompt=(0,))
    out = sample(logits, [r]).to_lists()
    lsm = logits.log_softmax(-1)[0]
    assert out.token_ids == [1]
    assert math.isclose(out.logprob[0], lsm[1].item(), rel_tol=1e-6)
    assert set(out.top_logprobs[0]) == {1, 2}


def test_logprobs_per_row_in_a_mixed_batch():
    torch.manual_seed(2)
    logits = torch.randn(4, 30)
    reqs = [_req("a", logprobs=3, seed=1), _req("b"), _req("c", logprobs=0, temperature=0),
            _req("d", logprobs=1, seed=2, top_k=4)]
    out = sample(logits, reqs).to_lists()
    lsm = logits.log_softmax(-1)
    assert out.logprob[1] is None and out.top_logprobs[1] is None
    assert out.top_logprobs[2] == {out.token_ids[2]: out.logprob[2]}  # logprobs=0: the sampled token only
    for i, k in [(0, 3), (2, 0), (3, 1)]:
        tok = out.token_ids[i]
        assert out.logprob[i] == lsm[i, tok].item()
        d = out.top_logprobs[i]
        assert list(d)[0] == tok
        top = lsm[i].topk(k) if k else None
        expected = {tok: lsm[i, tok].item()}
        if top is not None:
            expected.update(zip(top.indices.tolist(), top.values.tolist()))
        assert d == expected


def test_filtered_probs_greedy_rows_are_one_hot():
    logits = torch.tensor([[0.1, 2.0, 2.0, -1.0], [1.0, 0.0, 0.5, 0.2]])
    p = filtered_probs(logits, [SamplingParams(temperature=0), SamplingParams(temperature=1.0)])
    assert torch.equal(p[0], torch.tensor([0.0, 1.0, 0.0, 0.0]))  # ties: the argmax (lowest id)
    assert torch.allclose(p[1], logits[1].softmax(-1))


# -- no device synchronisation, no tensor off the logits' device ---------------------------------------------
def _hot_batch() -> list[Request]:
    """Every feature at once: greedy, seeded, unseeded, filters, penalties, min_tokens, logprobs."""
    return [_req("g", temperature=0, logprobs=2), _req("s", seed=3, top_k=5, top_p=0.9),
            _req("u", min_p=0.1, outputs=[1, 2, 2], repetition_penalty=1.2, frequency_penalty=0.5,
                 presence_penalty=0.1),
            _req("m", seed=4, eos=(0,), min_tokens=3, stop_token_ids=[4], logprobs=0),
            _req("t", temperature=0.5, seed=5, outputs=[7], prompt=[7, 8], repetition_penalty=0.9)]


def _fake_cuda_sample(generator=None):
    with FakeTensorMode():
        logits = torch.randn(5, 64, device="cuda")
        out = sample(logits, _hot_batch(), generator)
        for t in (out.token_ids, out.logprob, out.top_ids, out.top_logprobs):
            assert t is not None and t.device.type == "cuda"
        return out


@pytest.mark.parametrize("generator", [None, "cpu"])
def test_sample_runs_on_fake_cuda_without_syncs(generator):
    """Under FakeTensorMode any data-dependent read (.item(), .tolist(), bool(tensor), nonzero) raises, and so
    does an op mixing a CPU tensor into CUDA ones; CPU-only torch can still make fake CUDA tensors."""
    out = _fake_cuda_sample(torch.Generator().manual_seed(0) if generator else None)
    assert out.token_ids.shape == (5,) and out.top_ids is not None and out.top_ids.shape == (5, 2)


def test_the_fake_cuda_check_catches_a_cpu_tensor(monkeypatch):
    monkeypatch.setattr(sampler, "_upload", lambda data, dtype, device: torch.tensor(data, dtype=dtype))
    with pytest.raises(FakeTensorDeviceMismatchError), FakeTensorMode():
        sample(torch.randn(2, 64, device="cuda"), [_req("a", seed=1, top_k=3), _req("b", temperature=0.5)])


def test_the_fake_cuda_check_catches_a_sync(monkeypatch):
    real = sampler.inverse_cdf

    def syncing(weights, u):
        tokens, total = real(weights, u)
        if bool((total > 0).all()):  # a host read of a device value
            return tokens, total
        return tokens, total

    monkeypatch.setattr(sampler, "inverse_cdf", syncing)
    with pytest.raises(DataDependentOutputException):
        _fake_cuda_sample()


@pytest.mark.gpu
def test_cuda_matches_cpu_and_never_syncs():
    torch.manual_seed(0)
    seeds = torch.randint(-(2 ** 62), 2 ** 62, (64,))
    cpu = uniform_noise(seeds, 3, torch.arange(64), SAMPLE_STREAM, 4096)
    gpu = uniform_noise(seeds.cuda(), 3, torch.arange(64).cuda(), SAMPLE_STREAM, 4096)
    assert torch.equal(cpu, gpu.cpu())
    logits = torch.randn(5, 4096)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sample(logits.cuda(), _hot_batch(), torch.Generator(device="cuda").manual_seed(0))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cuda_tokens = out.to_lists().token_ids
    cpu_tokens = sample(logits, _hot_batch()).to_lists().token_ids
    for i in (0, 1, 3, 4):  # greedy and seeded rows: the same tokens (unless probabilities differ in rounding)
        assert cuda_tokens[i] == cpu_tokens[i]
