"""Speculative decoding with a draft model (a perturbed copy of the tiny target) and with the quantized self-draft
(the target at int4): greedy output identical to plain decoding (batches, preemption, chunking, prefix hits);
the draft never reads KV it did not write; sampled output has exactly the target distribution with a real draft
model whose q differs from p (a wrong rule fails the same test); the cost-aware draft length.

The mechanism tests turn ``cost_aware`` off: on tiny models a draft costs as much as the target, so the
cost-aware rule would (rightly) stop drafting."""
from __future__ import annotations

import dataclasses
import itertools
from types import SimpleNamespace

import pytest
import torch

import fastinfer.worker.model_runner as model_runner
from fastinfer import LLM, SamplingParams
from fastinfer.config import SpeculativeConfig
from fastinfer.core.request import Request
from fastinfer.worker.draft_model import DraftModelProposer
from fastinfer.worker.rejection_sampler import VerifyOutput, verify
from fastinfer.worker.sampler import filtered_probs
from fastinfer.worker.spec_decode import Speculator
from tests.engine.spec_models import SMALL_VOCAB, chi2, perturbed_copy, small_vocab_model

PASSAGE = ("The printing press spread across Europe in the fifteenth century. The printing press made books "
           "cheaper. Books became cheaper and the printing press spread. ")
PROMPTS = [PASSAGE + "Repeat the passage above exactly:", "1 2 3 1 2 3 1 2 3 1 2", "abc abc abc abc"]
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
KWS = {
    "plain": {},
    "preempt": {"num_kv_blocks": 30, "block_size": 4, "max_model_len": 96},  # preemption + evictions
    "chunked": {"max_num_batched_tokens": 7, "block_size": 8},  # chunked prefill and chunked draft catch-up
}


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def draft_dir(tiny_model_dir, tmp_path_factory):
    """A draft that agrees with the tiny target often, not always (about half of greedy drafts accepted)."""
    return perturbed_copy(tiny_model_dir("llama"), str(tmp_path_factory.mktemp("draft")), noise=0.05)


@pytest.fixture(scope="module", params=["draft_model", "int4_self_draft"])
def spec_config(request, draft_dir):
    base = {"num_speculative_tokens": 4, "disable_by_batch_size": 8, "cost_aware": False}
    if request.param == "draft_model":
        return {"method": "draft_model", "model": draft_dir, **base}
    return {"method": "draft_model", "quantization": "int4-g32", **base}  # the tiny widths: group 32


@pytest.fixture(scope="module")
def plain_outputs(tiny_llm):
    cache: dict[str, list[list[int]]] = {}

    def get(kw_name: str) -> list[list[int]]:
        if kw_name not in cache:
            cache[kw_name] = _tokens(tiny_llm("llama", **KWS[kw_name]).generate(PROMPTS, GREEDY, use_tqdm=False))
        return cache[kw_name]

    return get


def test_config_validation():
    assert SpeculativeConfig.from_dict({"method": "draft_model"}).draft_quantization == "int4"  # self-draft
    c = SpeculativeConfig.from_dict({"method": "draft_model", "model": "x", "num_speculative_tokens": 3})
    assert not c.self_draft and c.draft_quantization is None
    with pytest.raises(ValueError, match="draft_model"):
        SpeculativeConfig.from_dict({"method": "ngram", "model": "x"})
    with pytest.raises(ValueError, match="quantization"):
        SpeculativeConfig.from_dict({"method": "draft_model", "quantization": "int3"})
    with pytest.raises(ValueError, match="method"):
        SpeculativeConfig.from_dict({"method": "eagle"})


def test_draft_with_another_vocabulary_is_refused(tiny_llm, tmp_path):
    other = small_vocab_model(str(tmp_path / "small"), seed=0)
    with pytest.raises(ValueError, match="context length"):
        tiny_llm("llama", speculative_config={"method": "draft_model", "model": other})
    with pytest.raises(ValueError, match="vocabulary"):
        tiny_llm("llama", max_model_len=64, speculative_config={"method": "draft_model", "model": other})


@pytest.mark.parametrize("kw_name", list(KWS))
def test_greedy_identical_with_and_without_speculation(tiny_llm, spec_config, plain_outputs, kw_name):
    plain = plain_outputs(kw_name)
    spec = tiny_llm("llama", speculative_config=spec_config, **KWS[kw_name])
    for _ in range(2):  # second pass: prefix-cache hits (target and draft blocks)
        assert _tokens(spec.generate(PROMPTS, GREEDY, use_tqdm=False)) == plain
    one_by_one = [_tokens(spec.generate(p, GREEDY, use_tqdm=False))[0] for p in PROMPTS]
    assert one_by_one == plain
    st = spec.engine.spec_summary()
    assert st["draft_tokens"] > 0 and 0 < st["accepted_tokens"] <= st["draft_tokens"]
    assert st["draft_time_s"] > 0 and st["verify_time_s"] > 0 and st["mean_acceptance_length"] > 1
    if kw_name == "preempt":
        assert spec.engine.scheduler.num_preemptions > 0
    assert spec.engine.kv.pool.num_free_blocks == spec.engine.num_kv_blocks
    prop = spec.engine.worker.proposer
    assert isinstance(prop, DraftModelProposer) and prop.num_nonfinite == 0


def _poison(prop: DraftModelProposer, keep: set[int]) -> None:
    """NaN into every draft KV block except ``keep``: a read of any of them would surface as NaN logits."""
    mask = torch.ones(prop.kv_caches[0][0].shape[0], dtype=torch.bool)
    mask[sorted(keep)] = False
    for k, v in prop.kv_caches:
        k[mask] = float("nan")
        v[mask] = float("nan")


@pytest.mark.parametrize("kw_name", ["plain", "preempt"])
def test_draft_reads_only_its_own_kv_and_reuses_it_on_prefix_hits(tiny_llm, draft_dir, plain_outputs, kw_name):
    spec = tiny_llm("llama", speculative_config={"method": "draft_model", "model": draft_dir,
                                                 "disable_by_batch_size": 8, "cost_aware": False}, **KWS[kw_name])
    prop = spec.engine.worker.proposer
    assert isinstance(prop, DraftModelProposer)
    _poison(prop, set())  # never-written slots are NaN
    assert _tokens(spec.generate(PROMPTS, GREEDY, use_tqdm=False)) == plain_outputs(kw_name)
    assert prop.num_nonfinite == 0
    assert prop.valid_blocks
    reused = prop.num_reused_tokens
    _poison(prop, set(prop.valid_blocks))  # only blocks recorded as holding draft KV of their content survive
    assert _tokens(spec.generate(PROMPTS, GREEDY, use_tqdm=False)) == plain_outputs(kw_name)
    assert prop.num_nonfinite == 0
    if kw_name == "plain":  # nothing evicted: the second pass starts from the draft KV of the first
        assert spec.engine.kv.prefix_hits > 0
        assert prop.num_reused_tokens - reused >= 32  # the passage's two full prompt blocks
    _poison(prop, set(prop.valid_blocks))
    drafted = spec.engine.spec_stats["draft_tokens"]
    sp = SamplingParams(n=3, temperature=0.8, seed=7, max_tokens=24, ignore_eos=True)  # forks share blocks
    outs = spec.generate(PROMPTS[:2], sp, use_tqdm=False)
    assert all(len({tuple(c.token_ids) for c in o.outputs}) == 3 for o in outs)
    assert prop.num_nonfinite == 0 and spec.engine.spec_stats["draft_tokens"] > drafted


def test_requests_with_different_k_share_one_draft_batch_and_metrics(tiny_llm, draft_dir, monkeypatch):
    spec = tiny_llm("llama", speculative_config={"method": "draft_model", "model": draft_dir,
                                                 "num_speculative_tokens": 4, "disable_by_batch_size": 8,
                                                 "cost_aware": False})
    calls: list[list[int]] = []
    inner = spec.engine.worker.proposer.propose

    def spy(reqs, ks, block_ids):
        calls.append(list(ks))
        return inner(reqs, ks, block_ids)

    monkeypatch.setattr(spec.engine.worker.proposer, "propose", spy)
    sps = [dataclasses.replace(GREEDY, max_tokens=m) for m in (3, 5, 30)]  # room for k = 1, 3, 4
    plain = _tokens(tiny_llm("llama").generate(PROMPTS, sps, use_tqdm=False))
    assert _tokens(spec.generate(PROMPTS, sps, use_tqdm=False)) == plain
    assert any(len(ks) > 1 and len(set(ks)) > 1 for ks in calls), calls
    pytest.importorskip("prometheus_client")
    from fastinfer.entrypoints.metrics import ServerMetrics

    text = ServerMetrics(lambda: SimpleNamespace(engine=spec.engine, num_in_flight=0), "m").render()[0].decode()
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("fastinfer_spec_decode")}
    st = spec.engine.spec_summary()
    assert values["fastinfer_spec_decode_acceptance_rate"] == pytest.approx(st["acceptance_rate"])
    assert values["fastinfer_spec_decode_mean_acceptance_length"] == pytest.approx(st["mean_acceptance_length"])
    assert values["fastinfer_spec_decode_draft_time_seconds_total"] > 0
    assert values["fastinfer_spec_decode_verify_time_seconds_total"] > 0


def test_cost_aware_draft_length(tiny_llm, tiny_model_dir, tmp_path):
    bad = perturbed_copy(tiny_model_dir("llama"), str(tmp_path / "bad"), noise=1.0)  # almost never right
    spec = tiny_llm("llama", speculative_config={"method": "draft_model", "model": bad, "disable_by_batch_size": 8})
    outs = spec.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert _tokens(outs) == _tokens(tiny_llm("llama").generate(PROMPTS, GREEDY, use_tqdm=False))
    st = spec.engine.spec_stats
    assert 0 < st["draft_tokens"] < 0.25 * sum(len(t) for t in _tokens(outs))  # first tries and probes only
    # the draft-length rule itself, on the engine's proposer with set step costs
    sp = Speculator(SpeculativeConfig(method="draft_model", model=bad), spec.engine.worker.proposer, 512)
    req = Request("r", [1, 2, 3], SamplingParams(temperature=0, max_tokens=1000))
    req.output_token_ids = [5]  # not a probe position
    sp.step_s, sp.draft_step_s = 1.0, 0.1  # a draft step costs a tenth of a target step
    req.spec_acceptance = 0.9
    assert sp.draft_length(req, 4) == 4
    req.spec_acceptance = 0.3
    assert 1 <= sp.draft_length(req, 4) < 4
    sp.draft_step_s = 2.0  # dearer than the target: never pays
    req.spec_acceptance = 1.0
    assert sp.draft_length(req, 4) == 0
    req.output_token_ids = [5] * sp.PROBE_EVERY
    assert sp.draft_length(req, 4) == 1  # but a probe keeps the acceptance measured
    sp.draft_step_s = 0.1
    short = Request("s", list(range(1, 200)), SamplingParams(temperature=0, max_tokens=20))
    short.output_token_ids = [5] * 10  # 10 tokens left, the draft would first have to run all 209
    short.all_token_ids = short.all_token_ids + short.output_token_ids
    assert sp.draft_length(short, 4) == 0


def test_seeded_sampling_with_draft_is_reproducible(tiny_llm, draft_dir):
    spec = tiny_llm("llama", speculative_config={"method": "draft_model", "model": draft_dir,
                                                 "disable_by_batch_size": 8, "cost_aware": False})
    sps = [SamplingParams(temperature=0.8, top_p=0.9, seed=s, max_tokens=20, ignore_eos=True) for s in (1, 2, 3)]
    a = _tokens(spec.generate(PROMPTS, sps, use_tqdm=False))
    b = _tokens(spec.generate(PROMPTS, sps, use_tqdm=False))
    assert a == b and len({tuple(t) for t in a}) == 3
    assert spec.engine.spec_stats["draft_tokens"] > 0


# -- the output distribution with a real draft model ---------------------------------------------------------

SMALL_PROMPT = [0, 2, 3, 4]
NUM_TOKENS = 3  # token 1 from the prefill, tokens 2-3 from verifying 2 drafts (or a rejection + one decode)
PARAMS = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=3),
          SamplingParams(temperature=1.3, top_p=0.8)]


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    """A small-vocabulary target and an unrelated (1-layer, other seed) draft: q really differs from p."""
    target = small_vocab_model(str(tmp_path_factory.mktemp("sv-target")), seed=0)
    draft = small_vocab_model(str(tmp_path_factory.mktemp("sv-draft")), seed=1, num_layers=1)
    llm = LLM(target, speculative_config={"method": "draft_model", "model": draft, "num_speculative_tokens": 2,
                                          "disable_by_batch_size": 1 << 20, "cost_aware": False},
              load_progress=False, dtype="float32", max_num_seqs=512, max_model_len=64)
    return target, llm


def _exact_joint(target_dir: str, params: SamplingParams) -> torch.Tensor:
    """The target's distribution of the first NUM_TOKENS tokens [V ** NUM_TOKENS], from HF transformers."""
    import transformers

    hf = transformers.LlamaForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    v = SMALL_VOCAB
    cond = {}
    with torch.no_grad():
        for n in range(NUM_TOKENS):
            for prefix in itertools.product(range(v), repeat=n):
                logits = hf(torch.tensor([SMALL_PROMPT + list(prefix)])).logits[0, -1:].float()  # [1, V]
                cond[prefix] = filtered_probs(logits, [params])[0]
    joint = torch.zeros(v ** NUM_TOKENS)
    for seq in itertools.product(range(v), repeat=NUM_TOKENS):
        joint[_cell(seq)] = torch.stack([cond[seq[:i]][t] for i, t in enumerate(seq)]).prod()
    return joint


def _cell(seq) -> int:
    return sum(t * SMALL_VOCAB ** (len(seq) - 1 - i) for i, t in enumerate(seq))


def _resample_from_p(logits, draft, req, generator, draft_probs=None):
    """Wrong: the right acceptance test min(1, p/q), but a rejected token is redrawn from p, not from the
    residual max(0, p - q): the draft's choices are over-weighted."""
    probs = filtered_probs(logits, [req.sampling_params] * logits.shape[0])
    g = torch.Generator().manual_seed(req.sampling_params.seed * 1000 + req.num_output_tokens)
    out = []
    for i, d in enumerate(draft):
        q = 1.0 if draft_probs is None else draft_probs[i, d].item()
        if torch.rand((), generator=g).item() * q < probs[i, d].item():
            out.append(d)
            continue
        return out + [int(torch.multinomial(probs[i], 1, generator=g))]
    return out + [int(torch.multinomial(probs[len(draft)], 1, generator=g))]


def _batched(single):
    """A per-request verification rule in the batched rejection sampler's shape (what the model runner calls)."""
    def rejection_sample(logits, drafts, states, draft_probs=None, generator=None):
        rows, start = [], 0
        for r, (d, st) in enumerate(zip(drafts, states)):
            q = None if draft_probs is None else draft_probs[r]
            rows.append(single(logits[start:start + len(d) + 1], d, st, generator, q))
            start += len(d) + 1
        width = max(len(d) for d in drafts) + 1
        tokens = torch.tensor([t + [-1] * (width - len(t)) for t in rows])
        return VerifyOutput(tokens, torch.tensor([len(t) - 1 for t in rows]))
    return rejection_sample


@pytest.mark.parametrize("params", PARAMS, ids=["temperature", "top_k", "top_p"])
def test_sampled_distribution_with_a_real_draft_is_the_target(small_pair, params, monkeypatch):
    target, llm = small_pair
    expected = _exact_joint(target, params)
    n = 2000

    def run() -> tuple[float, int, float]:
        before = dict(llm.engine.spec_stats)
        sps = [dataclasses.replace(params, seed=i, max_tokens=NUM_TOKENS, ignore_eos=True) for i in range(n)]
        counts = torch.zeros(SMALL_VOCAB ** NUM_TOKENS)
        for o in llm.generate([{"prompt_token_ids": SMALL_PROMPT}] * n, sps, use_tqdm=False):
            counts[_cell(o.outputs[0].token_ids)] += 1
        st = llm.engine.spec_stats
        acc = (st["accepted_tokens"] - before["accepted_tokens"]) / (st["draft_tokens"] - before["draft_tokens"])
        return (*chi2(counts, expected, n), acc)

    stat, dof, acc = run()
    assert 0.2 < acc < 0.9  # a real draft: often right, often wrong (q differs from p)
    assert stat < dof + 5 * (2 * dof) ** 0.5  # far inside the bulk of the chi-square distribution
    monkeypatch.setattr(model_runner, "rejection_sample", _batched(_resample_from_p))
    bad, bad_dof, _ = run()
    assert bad > bad_dof + 10 * (2 * bad_dof) ** 0.5  # the wrong rule is caught by the same test


def _inverted_ratio(logits, draft, req, generator, draft_probs=None):
    """Wrong: accepts with min(1, q/p) instead of min(1, p/q) (right residual)."""
    assert draft_probs is not None
    probs = filtered_probs(logits, [req.sampling_params] * logits.shape[0])
    g = torch.Generator().manual_seed(req.sampling_params.seed)
    out = []
    for i, d in enumerate(draft):
        if torch.rand((), generator=g).item() * probs[i, d].item() < draft_probs[i, d].item():
            out.append(d)
            continue
        residual = (probs[i] - draft_probs[i]).clamp(min=0)
        return out + [int(torch.multinomial(residual / residual.sum(), 1, generator=g))]
    return out + [int(torch.multinomial(probs[len(draft)], 1, generator=g))]


@pytest.mark.parametrize("params", PARAMS, ids=["temperature", "top_k", "top_p"])
def test_verify_with_draft_probs_is_lossless(params):
    """verify() alone, drafts drawn from q (its own filtered distribution, unlike p) at two positions. The first
    token must be ~ p0; the second exists exactly when the first equals draft 0 (probability min(p0, q0) for
    each token: the maximal coupling) and is then ~ p1."""
    torch.manual_seed(0)
    vocab, n = 5, 5000
    p_logits = torch.randn(3, vocab) * 1.5  # rows: draft 0, draft 1, bonus
    q = filtered_probs(torch.randn(2, vocab) * 1.5, [params] * 2)  # [2, V]
    p = filtered_probs(p_logits, [params] * 3)
    both = torch.minimum(p[0], q[0])
    expected = torch.cat([(both[:, None] * p[1][None, :]).flatten(), p[0] - both])  # [(t0, t1)..., (t0, none)...]

    def counts(rule) -> torch.Tensor:
        c = torch.zeros(vocab * vocab + vocab)
        g = torch.Generator().manual_seed(1)
        for i in range(n):
            draft = [int(torch.multinomial(q[j], 1, generator=g)) for j in range(2)]
            req = Request("r", [0], dataclasses.replace(params, seed=i))
            toks = rule(p_logits, draft, req, None, q)
            c[toks[0] * vocab + toks[1] if len(toks) > 1 else vocab * vocab + toks[0]] += 1
        return c

    stat, dof = chi2(counts(verify), expected, n)
    assert stat < dof + 5 * (2 * dof) ** 0.5
    bad, bad_dof = chi2(counts(_inverted_ratio), expected, n)
    assert bad > bad_dof + 10 * (2 * bad_dof) ** 0.5
