"""Serving benchmark: a live ``fastinfer serve`` process on localhost driven by bounded numbers of concurrent
streaming clients (prefix caching off, so repeated prompts across levels do not flatter later levels);
throughput, TTFT and inter-token latency percentiles, and the same workload through the
offline ``LLM.generate`` (after the server stops, so they never share the cores) for the overhead ratio.

    python benchmarks/bench_serving.py --concurrency 1,8,32,64 --requests 64
    python benchmarks/bench_serving.py --fixed 128,64 --concurrency 16 --dtype float32      # issue 15's load
    python benchmarks/bench_serving.py --fixed 128,64 --concurrency 16 --target http://127.0.0.1:8000

``--fixed P,O``: every request has P prompt tokens (windows of the standard workload's real text) and O output
tokens. ``--target URL``: drive a server that is already running there instead (vLLM's ``api_server`` started
with ``--served-model-name m``, say) with the same load client and workload; no offline comparison then.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, make_workload, table  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def drive(url: str, items: list[dict], conc: int, model: str = "m") -> dict:
    sem = asyncio.Semaphore(conc)
    ttfts, itls, tpots, lost = [], [], [], 0
    out_tokens = 0

    async def one(c: httpx.AsyncClient, it: dict) -> None:
        nonlocal lost, out_tokens
        async with sem:
            body = {"model": model, "prompt": it["prompt_token_ids"], "max_tokens": it["max_tokens"],
                    "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            last: float | None = None
            first: float | None = None
            usage = 0
            async with c.stream("POST", url + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    lost += 1
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    ev = json.loads(line[6:])
                    now = time.perf_counter()
                    if ev["choices"] and ev["choices"][0]["text"]:
                        if last is None:
                            ttfts.append(now - t0)
                            first = now
                        else:
                            itls.append(now - last)
                        last = now
                    if not ev["choices"]:
                        usage = ev["usage"]["completion_tokens"]
            if usage != it["max_tokens"]:
                lost += 1
            elif usage > 1 and last is not None and first is not None:
                tpots.append((last - first) / (usage - 1))
            out_tokens += usage

    t = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=conc)) as c:
        await asyncio.gather(*[one(c, it) for it in items])
    el = time.perf_counter() - t
    return {"requests": len(items), "elapsed_s": el, "output_tok_s": out_tokens / el, "lost": lost,
            "ttft_p50_s": pct(ttfts, 50), "ttft_p90_s": pct(ttfts, 90), "ttft_p99_s": pct(ttfts, 99),
            "itl_p50_s": pct(itls, 50), "itl_p90_s": pct(itls, 90), "itl_p99_s": pct(itls, 99),
            "itl_mean_s": statistics.fmean(itls) if itls else float("nan"), "tpot_p50_s": pct(tpots, 50)}


def serve_and_drive(args, items: list[dict], n: int, levels: list[int], rows: list[dict], rnd: int) -> dict:
    """Start ``fastinfer serve``, drive each concurrency level, stop it (SIGTERM); the top level's row."""
    srv = subprocess.Popen([sys.executable, "-m", "fastinfer", "serve", args.model, "--port", str(args.port),
                            "--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
                            "--max-num-seqs", str(max(args.concurrency)), "--served-model-name", "m",
                            "--max-pending", str(n), "--no-enable-prefix-caching"])
    url = f"http://127.0.0.1:{args.port}"
    out: list[dict] = []
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
            if srv.poll() is not None:
                sys.exit("server failed to start")
        asyncio.run(drive(url, items[:2], 1))  # warm-up
        for c in levels:
            sub = items[:max(c, min(args.requests, n))]
            emit({"case": "serving", "round": rnd, "concurrency": c, **asyncio.run(drive(url, sub, c))}, out)
    finally:
        srv.send_signal(signal.SIGTERM)
        srv.wait(120)
    rows.extend(out)
    return out[-1]


def offline_tok_s(args, full: list[dict]) -> float:
    """The same requests through ``LLM.generate`` in this process (the server has stopped)."""
    from fastinfer import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=max(args.concurrency),
              enable_prefix_caching=False, load_progress=False)
    llm.generate([{"prompt_token_ids": it["prompt_token_ids"]} for it in full[:2]],
                 SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": it["prompt_token_ids"]} for it in full],
                        [SamplingParams(temperature=0, max_tokens=it["max_tokens"], ignore_eos=True) for it in full],
                        use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--concurrency", default="1,8,32,64", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level (>= the level)")
    ap.add_argument("--port", type=int, default=8321)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3, help="server/offline alternations (median ratio)")
    ap.add_argument("--fixed", default=None, help="P,O: fixed prompt and output lengths")
    ap.add_argument("--target", default=None, help="URL of a running server to drive instead of fastinfer serve")
    ap.add_argument("--target-model", default="m", help="model name the --target server serves")
    args = ap.parse_args()

    from fastinfer.models.loader import load_tokenizer

    tok = load_tokenizer(args.model)
    n = max(args.requests, max(args.concurrency))
    wl = make_workload("mixed", n, 0)
    items = [{"prompt_token_ids": tok.encode(w["prompt"]), "max_tokens": w["max_tokens"]} for w in wl]
    if args.fixed:
        p_len, o_len = (int(x) for x in args.fixed.split(","))
        stream = [t for it in items for t in it["prompt_token_ids"]]
        items = [{"prompt_token_ids": (stream * (1 + p_len * n // max(1, len(stream))))[i * p_len:(i + 1) * p_len],
                  "max_tokens": o_len} for i in range(n)]
    if args.target:
        rows: list[dict] = []
        for c in args.concurrency:
            asyncio.run(drive(args.target, items[:2], 1, args.target_model))  # warm-up
            emit({"case": "serving", "target": args.target, "concurrency": c,
                  **asyncio.run(drive(args.target, items[:max(c, min(args.requests, n))], c, args.target_model))},
                 rows)
        print(table(rows, ["concurrency", "requests", "output_tok_s", "ttft_p50_s", "tpot_p50_s", "itl_p99_s",
                           "lost"]))
        return

    full = items[:n]
    rows = []
    ratios = []
    for rnd in range(args.rounds):
        # later rounds repeat only the top level: server and offline alternate, so slow drifts of the machine
        # hit both sides alike; the ratio reported is the median over rounds
        levels = args.concurrency if rnd == 0 else [max(args.concurrency)]
        top = serve_and_drive(args, items, n, levels, rows, rnd)
        offline = offline_tok_s(args, full)
        ratios.append(top["output_tok_s"] / offline)
        emit({"case": "server_vs_offline", "round": rnd, "requests": len(full), "concurrency": top["concurrency"],
              "server_tok_s": top["output_tok_s"], "offline_tok_s": offline, "ratio": ratios[-1]}, rows)
    emit({"case": "server_vs_offline_median", "rounds": len(ratios), "ratio": statistics.median(ratios)}, rows)
    print()
    print(table([r for r in rows if r["case"] == "serving"],
                ["round", "concurrency", "requests", "output_tok_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s",
                 "itl_p50_s", "itl_p99_s", "lost"]))


if __name__ == "__main__":
    main()
