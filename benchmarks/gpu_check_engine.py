"""gpu_check plugin: the engine end to end on the GPU. Loaded by benchmarks/gpu_check.py.

A tiny random Llama (built here from a ``transformers`` config, fp32, saved as safetensors with a small
word-level tokenizer made with ``tokenizers``: nothing from the GPU image's missing packages, no gguf) is
served by ``LLM(..., device="cuda")``, whose ops resolve to the Triton kernels, and by ``LLM(..., device="cpu",
attention_backend="torch")`` as the reference.

Checks:
- ``engine_greedy_cuda_vs_cpu``: a mixed batch (prompt lengths 3..300, chunked prefill, prefix-cache hits,
  preemption from a small KV pool) gives greedy tokens identical to the CPU torch backend; n-gram speculation
  on CUDA gives the same tokens again.
- ``engine_gemma2_windows``: a tiny Gemma 2 (sliding-window and global layers, so two KV cache groups, and
  soft-capping) gives greedy tokens identical to the CPU torch backend, prompts past the window included.
- ``engine_seeded_sampling``: seeded top-k / top-p sampling is reproducible on CUDA and does not depend on
  batch mates; n > 1 samples differ from each other.
- ``engine_mixed_requests_triton``: every op ran on Triton; a batch mixing greedy, seeded, unseeded, penalties,
  logprobs and n=2 requests finishes with the token counts asked for.
Bench ``engine_decode``: single-stream and 32-request decode tok/s of the tiny model on the GPU (engine
overhead dominates at this size: a per-step cost measure, not a kernel one).
``--dry``: the same checks on the CPU with the Triton backend under the interpreter.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

_DIR: dict[str, str] = {}
VOCAB = 512
MIX = 6  # tokens per request of the mixed batch


def _model_dir(arch: str = "llama") -> str:
    """A tiny random model with GQA, saved once per run (fp32 safetensors + a word-level tokenizer): "llama", or
    "gemma2" (sliding-window and global layers, attention and final soft-capping: KV cache groups on the GPU)."""
    if arch in _DIR:
        return _DIR[arch]
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)
    if arch == "gemma2":
        cfg = transformers.Gemma2Config(**common, num_hidden_layers=4, head_dim=32, sliding_window=16,
                                        attn_logit_softcapping=20.0, final_logit_softcapping=15.0)
        model = transformers.Gemma2ForCausalLM(cfg).to(torch.float32)
    else:
        cfg = transformers.LlamaConfig(**common, num_hidden_layers=2, tie_word_embeddings=False, rope_theta=10000.0)
        model = transformers.LlamaForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)  # sharper logits than the default init: fewer near-ties
    d = tempfile.mkdtemp(prefix="gpu-check-tiny-")
    model.save_pretrained(d, safe_serialization=True)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")
    fast.save_pretrained(d)
    with open(os.path.join(d, "config.json")) as fh:
        assert json.load(fh)["architectures"] == [type(model).__name__]
    _DIR[arch] = d
    return d


def _llm(ctx: Any, arch: str = "llama", **kw: Any) -> Any:
    from fastinfer import LLM

    if ctx.dry and kw.get("device") != "cpu":
        kw = {**kw, "device": "cpu", "attention_backend": "triton"}  # the interpreter path
    kw.setdefault("device", ctx.device)
    return LLM(_model_dir(arch), dtype="float32", max_model_len=1024, load_progress=False, **kw)


def _prompts(n: int, seed: int = 0, dry: bool = False) -> list[dict]:
    import random

    rng = random.Random(seed)
    shared = [rng.randrange(3, VOCAB) for _ in range(16 if dry else 48)]  # a common prefix (prefix-cache hits)
    out = []
    for i in range(n):
        length = rng.choice([3, 9, 20] if dry else [3, 17, 64, 130, 300])
        body = [rng.randrange(3, VOCAB) for _ in range(length)]
        out.append({"prompt_token_ids": (shared + body) if i % 3 == 0 else body})
    return out


def _tokens(outs: list) -> list[list[int]]:
    return [list(c.token_ids) for o in outs for c in o.outputs]


def check_engine_greedy(ctx: Any) -> None:
    from fastinfer import SamplingParams

    n = 4 if ctx.dry else 24
    prompts = _prompts(n, dry=ctx.dry)
    greedy = [SamplingParams(temperature=0, max_tokens=4 if ctx.dry else 24 + 4 * (i % 5), ignore_eos=True)
              for i in range(n)]
    kw = ({"max_num_batched_tokens": 32, "num_kv_blocks": 80, "block_size": 16, "max_num_seqs": 4} if ctx.dry
          else {"max_num_batched_tokens": 256, "num_kv_blocks": 96, "block_size": 16, "max_num_seqs": 16})
    ref = _tokens(_llm(ctx, device="cpu", attention_backend="torch", **kw).generate(prompts, greedy,
                                                                                      use_tqdm=False))
    gpu = _llm(ctx, **kw)
    got = _tokens(gpu.generate(prompts, greedy, use_tqdm=False))
    bad = [i for i, (a, b) in enumerate(zip(got, ref)) if a != b]
    assert not bad, f"greedy tokens differ from the CPU torch backend for requests {bad[:5]}"
    assert _tokens(gpu.generate(prompts, greedy, use_tqdm=False)) == ref, "second pass (prefix-cache hits) differs"
    assert gpu.engine.kv.prefix_hits > 0
    spec = _llm(ctx, speculative_config={"method": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": 64},
                **kw)
    assert _tokens(spec.generate(prompts, greedy, use_tqdm=False)) == ref, "n-gram speculation changed the tokens"
    ctx.emit({"case": "engine_greedy", "device": gpu.engine.device, "requests": n,
              "preemptions": gpu.engine.scheduler.num_preemptions,
              "spec_draft_tokens": spec.engine.spec_summary()["draft_tokens"]})


def check_engine_gemma2_windows(ctx: Any) -> None:
    """Gemma 2 (window 16 on every other layer, soft-capping): greedy tokens on CUDA equal the CPU torch backend
    with prompts past the window, chunked prefill across its edge and prefix hits."""
    from fastinfer import SamplingParams

    n = 3 if ctx.dry else 12
    prompts = _prompts(n, seed=5, dry=ctx.dry)
    greedy = SamplingParams(temperature=0, max_tokens=4 if ctx.dry else 40, ignore_eos=True)
    kw = {"max_num_batched_tokens": 32 if ctx.dry else 128, "block_size": 16, "max_num_seqs": 4 if ctx.dry else 8,
          "enable_prefix_caching": True}
    ref = _tokens(_llm(ctx, "gemma2", device="cpu", attention_backend="torch", **kw).generate(prompts, greedy,
                                                                                                use_tqdm=False))
    gpu = _llm(ctx, "gemma2", **kw)
    got = _tokens(gpu.generate(prompts, greedy, use_tqdm=False))
    bad = [i for i, (a, b) in enumerate(zip(got, ref)) if a != b]
    assert not bad, f"Gemma 2 greedy tokens differ from the CPU torch backend for requests {bad[:5]}"
    assert _tokens(gpu.generate(prompts, greedy, use_tqdm=False)) == ref, "second pass (prefix-cache hits) differs"
    ctx.emit({"case": "engine_gemma2_windows", "device": gpu.engine.device, "requests": n})


def check_engine_seeded(ctx: Any) -> None:
    from fastinfer import SamplingParams

    llm = _llm(ctx)
    prompts = _prompts(3, seed=1, dry=ctx.dry)
    new = 4 if ctx.dry else 12
    sps = [SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=s, max_tokens=new, ignore_eos=True)
           for s in range(3)]
    a = _tokens(llm.generate(prompts, sps, use_tqdm=False))
    b = _tokens(llm.generate(prompts, sps, use_tqdm=False))
    assert a == b, "seeded sampling is not reproducible"
    alone = _tokens(llm.generate(prompts[2], sps[2], use_tqdm=False))[0]
    assert alone == a[2], "a seeded sample depends on its batch mates"
    many = _tokens(llm.generate(prompts[0], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=new,
                                                           ignore_eos=True), use_tqdm=False))
    assert len({tuple(t) for t in many}) == 3, "n=3 seeded samples are not distinct"
    spec = _llm(ctx, speculative_config={"method": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": 8})
    s1 = _tokens(spec.generate(prompts, sps, use_tqdm=False))
    assert s1 == _tokens(spec.generate(prompts, sps, use_tqdm=False)), "seeded speculative sampling not reproducible"


def check_engine_mixed(ctx: Any) -> None:
    from fastinfer import SamplingParams
    from fastinfer.ops.registry import OPS_WITHOUT_TRITON

    llm = _llm(ctx)
    chosen = llm.engine.worker.ops.chosen
    # every kernel op on Triton; argmax (torch's own device kernel on a GPU) and W4A8 (a CPU technique) have none
    kernels = {op: b for op, b in chosen.items() if op not in OPS_WITHOUT_TRITON}
    assert set(kernels.values()) == {"triton"}, f"not every op ran on Triton: {chosen}"
    prompts = _prompts(8, seed=2, dry=ctx.dry)
    sps = [SamplingParams(temperature=0, max_tokens=MIX, ignore_eos=True),
           SamplingParams(temperature=0.7, seed=3, max_tokens=MIX, ignore_eos=True),
           SamplingParams(temperature=1.0, max_tokens=MIX, ignore_eos=True),
           SamplingParams(temperature=0.8, top_p=0.5, repetition_penalty=1.3, frequency_penalty=0.2,
                          max_tokens=MIX, ignore_eos=True),
           SamplingParams(temperature=0, logprobs=3, max_tokens=MIX, ignore_eos=True),
           SamplingParams(n=2, temperature=0.8, seed=4, max_tokens=MIX, ignore_eos=True),
           SamplingParams(temperature=0.6, min_p=0.1, min_tokens=3, max_tokens=MIX),
           SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)]
    outs = llm.generate(prompts, sps, use_tqdm=False)
    for o, sp in zip(outs, sps):
        assert o.error is None, o.error
        assert len(o.outputs) == sp.n
        for c in o.outputs:
            assert sp.min_tokens <= len(c.token_ids) <= sp.max_tokens, (sp, c.token_ids)
            assert all(0 <= t < VOCAB for t in c.token_ids)
    assert outs[4].outputs[0].logprobs is not None and len(outs[4].outputs[0].logprobs) == MIX


def check_engine_request_surface(ctx: Any) -> None:
    """Structured outputs (xgrammar's bitmask op on the device), prompt logprobs and logit rules on the device
    vs the CPU torch backend."""
    from fastinfer import SamplingParams
    from fastinfer.sampling_params import StructuredOutputsParams

    prompts = _prompts(4, seed=5, dry=ctx.dry)
    choice = StructuredOutputsParams(choice=["w5", "w8", "w9"])  # one word-level token each
    sps = [SamplingParams(temperature=0, max_tokens=8, structured_outputs=choice),
           SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=3, ignore_eos=True),
           SamplingParams(temperature=0, max_tokens=6, logit_bias={7: 100}, ignore_eos=True),
           SamplingParams(temperature=0.8, seed=1, max_tokens=6, allowed_token_ids=[11, 12, 13], ignore_eos=True)]
    gpu = _llm(ctx).generate(prompts, sps, use_tqdm=False)
    cpu = _llm(ctx, device="cpu", attention_backend="torch").generate(prompts, sps, use_tqdm=False)
    assert gpu[0].outputs[0].text.strip() in ("w5", "w8", "w9"), gpu[0].outputs[0].text
    assert gpu[0].outputs[0].finish_reason == "stop"
    assert _tokens(gpu) == _tokens(cpu), "request-surface tokens differ from the CPU torch backend"
    assert gpu[2].outputs[0].token_ids == [7] * 6 and set(gpu[3].outputs[0].token_ids) <= {11, 12, 13}
    a, b = gpu[1].prompt_logprobs, cpu[1].prompt_logprobs
    assert a is not None and b is not None and len(a) == len(b) and a[0] is None
    worst = max(abs(a[i][t].logprob - b[i][t].logprob) for i in range(1, len(a)) for t in b[i] if t in a[i])
    assert worst < 1e-3, f"prompt logprobs differ from the CPU by {worst}"
    ctx.emit({"case": "engine_request_surface", "choice": gpu[0].outputs[0].text, "prompt_logprob_max_diff": worst})


def check_engine_decode_graphs(ctx: Any) -> None:
    """The captured decode step (CUDA graphs; the padded static path in the dry run) gives the eager tokens with
    batch sizes between the rungs, requests finishing mid-run, preemption, n-gram speculation and the int4
    self-draft (whose own decode steps are captured as well)."""
    from fastinfer import SamplingParams

    n = 4 if ctx.dry else 7  # dry: batches 4, 3 (between rungs), 2, 1 under the interpreter
    prompts = _prompts(n, seed=6, dry=ctx.dry)
    sps = [SamplingParams(temperature=0, max_tokens=(2 if ctx.dry else 10) + 3 * i, ignore_eos=True) for i in range(n)]
    rungs = [1, 2, 4] if ctx.dry else [1, 2, 4, 8]
    cc = {"mode": "static" if ctx.dry else "cuda_graph", "cudagraph_capture_sizes": rungs}
    draft = {"method": "draft_model", "quantization": "int4-g32", "num_speculative_tokens": 3, "cost_aware": False,
             "disable_by_batch_size": 64}  # the int4 self-draft: its single-token steps are captured too
    cases = [{}, {"num_kv_blocks": 70, "block_size": 16},  # preempts at full size (1120 slots)
             {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": 64}},
             {"speculative_config": draft}]
    for kw in cases[:1] if ctx.dry else cases:  # the dry run (Triton interpreter) checks the code path once
        want = _tokens(_llm(ctx, enforce_eager=True, **kw).generate(prompts, sps, use_tqdm=False))
        llm = _llm(ctx, max_num_seqs=8, compilation_config=cc, **kw)
        assert _tokens(llm.generate(prompts, sps, use_tqdm=False)) == want, f"captured decode differs ({kw})"
        assert llm.engine.worker.decode_graph_runs() > 0, "no step ran captured"
        if kw.get("speculative_config") is draft:
            assert llm.engine.worker.decode_graph_runs(draft=True) > 0, "no draft step ran captured"
    ctx.emit({"case": "engine_decode_graphs", "mode": cc["mode"], "rungs": ",".join(map(str, rungs))})


def bench_engine_decode(ctx: Any) -> None:
    from fastinfer import SamplingParams

    new = 4 if ctx.dry else 128
    one = [{"prompt_token_ids": list(range(3, 35))}]
    greedy = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    batch = _prompts(2 if ctx.dry else 32, seed=3, dry=ctx.dry)
    for eager in (True,) if ctx.dry else (True, False):  # graphs on / off (the dry run has no graphs)
        llm = _llm(ctx, max_num_seqs=32, enforce_eager=eager)
        llm.generate(one, greedy, use_tqdm=False)  # warm-up (Triton compiles)
        t = time.perf_counter()
        llm.generate(one, greedy, use_tqdm=False)
        single = new / (time.perf_counter() - t)
        t = time.perf_counter()
        outs = llm.generate(batch, greedy, use_tqdm=False)
        total = sum(len(c.token_ids) for o in outs for c in o.outputs)
        ctx.emit({"case": "engine_decode", "device": llm.engine.device, "graphs": not eager and not ctx.dry,
                  "single_tok_s": single, "batch_tok_s": total / (time.perf_counter() - t), "batch": len(batch)})
        del llm


def register(check: Any, bench: Any) -> None:
    check("engine_greedy_cuda_vs_cpu")(check_engine_greedy)
    check("engine_gemma2_windows")(check_engine_gemma2_windows)
    check("engine_seeded_sampling")(check_engine_seeded)
    check("engine_mixed_requests_triton")(check_engine_mixed)
    check("engine_request_surface")(check_engine_request_surface)
    check("engine_decode_graphs")(check_engine_decode_graphs)
    bench("engine_decode")(bench_engine_decode)
