"""SmolLM2-135M (the embedded GGUF: 9 query heads, 3 KV heads, tied embeddings) on 3 CPU ranks: greedy tokens
identical to one process (float32; the quantized shards' arithmetic is tested in test_sharding.py, the
engine path on int4 in test_tp_llama.py)."""
from __future__ import annotations

from fastinfer import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Tensor parallelism splits"]


def _greedy(llm: LLM) -> list[list[int]]:
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, sp, use_tqdm=False)]


def test_smollm2_tp3_equals_tp1(smollm2_path):
    kw = dict(dtype="float32", load_progress=False, max_model_len=256, max_num_seqs=4)
    ref = _greedy(LLM(smollm2_path, **kw))
    llm = LLM(smollm2_path, tensor_parallel_size=3, **kw)
    assert len(llm.worker_pids()) == 2
    assert _greedy(llm) == ref
    llm.shutdown()
