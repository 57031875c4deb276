"""Structured outputs: decode throughput with a JSON schema vs none, at 1 and 32 concurrent requests, and the
time to compile a schema (cold, with the tokenizer's one-off preprocessing; warm; a cache hit), in one run.

    python benchmarks/bench_structured.py [--model smollm2-135m] [--dtype auto] [--concurrency 1,32]
                                          [--max-tokens 160] [--repeats 3] [--quick]

Each constrained run is matched by an unconstrained one with the same number of tokens per request
(``ignore_eos`` and the constrained run's lengths), so the ratio is the grammar's cost per token (bitmask fill
on the step thread + one masked-logits op), not a difference in lengths. ``--quick`` checks the script works;
its figures mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, machine_line, table  # noqa: E402

from fastinfer import LLM, SamplingParams  # noqa: E402
from fastinfer.sampling_params import StructuredOutputsParams  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "year": {"type": "integer", "minimum": 1000, "maximum": 2100},
        "genre": {"type": "string", "enum": ["fiction", "history", "science", "poetry"]},
        "rating": {"type": "number", "minimum": 0, "maximum": 5},
        "authors": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 40}, "born": {"type": "integer"}},
            "required": ["name", "born"]}, "minItems": 1, "maxItems": 3},
        "summary": {"type": "string", "maxLength": 200},
    },
    "required": ["title", "year", "genre", "rating", "authors", "summary"],
}
TOPICS = ["the printing press", "the steam engine", "a lighthouse keeper", "the moon landing", "a river city",
          "ancient Rome", "a chess champion", "the first computers", "a mountain village", "honeybees"]


def prompts(tok, n: int) -> list[str]:
    msgs = [[{"role": "user", "content": f"Describe a book about {TOPICS[i % len(TOPICS)]} as a JSON record."}]
            for i in range(n)]
    return [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]


def run(llm: LLM, ps: list[str], sps: list[SamplingParams]) -> tuple[float, list[int], list[str]]:
    t = time.perf_counter()
    outs = llm.generate(ps, sps, use_tqdm=False)
    dt = time.perf_counter() - t
    lens = [len(o.outputs[0].token_ids) for o in outs]
    return sum(lens) / dt, lens, [o.outputs[0].text for o in outs]


def compile_times(llm: LLM, k: int) -> dict[str, float]:
    """Milliseconds: the first schema (includes xgrammar's one-off tokenizer preprocessing), the median of ``k``
    different new schemas, and a cache hit."""
    w = llm.engine.worker

    def timed(so: StructuredOutputsParams) -> float:
        t = time.perf_counter()
        w.compile_grammar(so)
        return 1e3 * (time.perf_counter() - t)

    def variant(i: int) -> StructuredOutputsParams:
        s = json.loads(json.dumps(SCHEMA))
        s["properties"][f"extra_{i}"] = {"type": "string", "maxLength": 10 + i}
        return StructuredOutputsParams(json=s)

    first = timed(variant(10_000))
    new = statistics.median(timed(variant(i)) for i in range(k))
    hit = statistics.median(timed(variant(0)) for _ in range(k))
    return {"first_ms": first, "new_schema_ms": new, "cache_hit_ms": hit}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--concurrency", default="1,32")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.concurrency, a.max_tokens, a.repeats = "1,4", 24, 1
    print(machine_line(), flush=True)
    # no prefix cache: the unconstrained run right after must not find the prompts cached
    llm = LLM(a.model, dtype=a.dtype, max_model_len=1024, load_progress=False, enable_prefix_caching=False)
    tok = llm.get_tokenizer()
    rows: list[dict] = []
    ct = compile_times(llm, 3 if a.quick else 8)
    emit({"case": "compile", **ct}, [])
    so = StructuredOutputsParams(json=SCHEMA)
    for c in (int(x) for x in a.concurrency.split(",")):
        ps = prompts(tok, c)
        llm.generate(ps[:1], SamplingParams(max_tokens=4, structured_outputs=so), use_tqdm=False)  # warm-up
        ratios, with_rates, plain_rates = [], [], []
        for _ in range(a.repeats):
            sp = SamplingParams(temperature=0, max_tokens=a.max_tokens, structured_outputs=so)
            r_with, lens, texts = run(llm, ps, [sp] * c)
            valid = sum(_valid(t) for t in texts)
            plain = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lens]
            r_plain, _, _ = run(llm, ps, plain)
            with_rates.append(r_with)
            plain_rates.append(r_plain)
            ratios.append(r_with / r_plain)
        emit({"concurrency": c, "schema_tok_s": statistics.median(with_rates),
              "plain_tok_s": statistics.median(plain_rates), "ratio": statistics.median(ratios),
              "valid_json": f"{valid}/{c}", "mean_tokens": sum(lens) / c}, rows)
    print(table(rows, ["concurrency", "schema_tok_s", "plain_tok_s", "ratio", "valid_json", "mean_tokens"]))
    print(f"schema compile: first {ct['first_ms']:.1f} ms (with tokenizer preprocessing), new schema "
          f"{ct['new_schema_ms']:.1f} ms (median), cache hit {ct['cache_hit_ms']:.3f} ms")


def _valid(text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


if __name__ == "__main__":
    main()
