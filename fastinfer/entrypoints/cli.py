"""The ``fastinfer`` command: ``generate`` one completion, ``chat`` interactively in the terminal, ``serve`` an
OpenAI-compatible API, ``verify`` a model and its settings against HF transformers, ``quantize`` a model to
int8/int4 safetensors, ``distill`` a draft model for speculative decoding."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastinfer.config import DEFAULT_MODEL
from fastinfer.distill.options import add_arguments as add_distill_arguments  # torch-free
from fastinfer.entrypoints.reasoning_parsers import REASONING_PARSERS
from fastinfer.entrypoints.tool_parsers import TOOL_PARSERS
from fastinfer.quantization import QuantSpec  # torch-free

if TYPE_CHECKING:
    from fastinfer.models.loader import LoadedModel


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"HF directory, .gguf file or short name (default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU) | cpu | cuda | cuda:N")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8", "fp8_e4m3", "fp8"],
                   help="KV cache storage: auto (the model dtype) | int8 | fp8_e4m3 (fp8: alias), quantized with "
                        "an fp16 scale per token and KV head (about half the bytes of bf16)")
    p.add_argument("--quantization", "-q", default=None,
                   help="int8 | int4 | int4-g32 | int4-g64 | int4-g128 | gguf (weight-only; default: float weights)")
    p.add_argument("--speculative-config", type=json.loads, default=None,
                   help='JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\', '
                        '\'{"method": "draft_model", "model": DRAFT}\' or \'{"method": "draft_model", '
                        '"quantization": "int4"}\' (int4 self-draft)')
    p.add_argument("--model-impl", default="auto", choices=["auto", "fastinfer", "transformers"],
                   help="auto: fastinfer's native class when there is one, else transformers' own modules with "
                        "fastinfer's paged attention (the generic path); or force one")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / compiled decode steps")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the model over N ranks (GPUs with NCCL, or CPU processes with gloo); ranks 1..N-1 "
                        "are spawned, or under torchrun every rank runs this same command")
    p.add_argument("--distributed-timeout-s", type=float, default=60.0,
                   help="tensor parallelism: a rank that does not answer within this many seconds fails the engine")
    p.add_argument("--compilation-config", "-O", type=json.loads, default=None,
                   help='JSON: {"mode": "auto|eager|cuda_graph|compile|static", "cudagraph_capture_sizes": [1, 2, 4]}')
    p.add_argument("-v", "--verbose", action="store_true", help="log engine details to stderr")


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _sampling(a: argparse.Namespace):
    from fastinfer.sampling_params import SamplingParams

    return SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                          min_p=a.min_p, repetition_penalty=a.repetition_penalty, seed=a.sample_seed,
                          stop=a.stop)


def _llm(a: argparse.Namespace):
    from fastinfer.entrypoints.llm import LLM

    return LLM(a.model, dtype=a.dtype, max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs, seed=a.seed,
               enable_prefix_caching=a.enable_prefix_caching, speculative_config=a.speculative_config,
               quantization=a.quantization, device=a.device, model_impl=a.model_impl,
               kv_cache_dtype=a.kv_cache_dtype, enforce_eager=a.enforce_eager, compilation_config=a.compilation_config,
               tensor_parallel_size=a.tensor_parallel_size, distributed_timeout_s=a.distributed_timeout_s,
               load_progress=sys.stderr.isatty())


def cmd_generate(a: argparse.Namespace) -> int:
    sp = _sampling(a)
    llm = _llm(a)
    prompt = llm.chat_prompt([{"role": "user", "content": a.prompt}]) if a.chat else a.prompt
    printed = ""
    for out in llm.stream(prompt, sp):
        if out.error:
            print(f"error: {out.error}", file=sys.stderr)
            return 1
        text = out.outputs[0].text
        sys.stdout.write(text[len(printed):])
        sys.stdout.flush()
        printed = text
    sys.stdout.write("\n")
    return 0


def cmd_chat(a: argparse.Namespace) -> int:
    sp = _sampling(a)
    llm = _llm(a)
    messages: list[dict[str, str]] = []
    if a.system:
        messages.append({"role": "system", "content": a.system})
    print("fastinfer chat: type a message, an empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        printed = ""
        try:
            for out in llm.stream(llm.chat_prompt(messages), sp):
                text = out.outputs[0].text
                sys.stdout.write(text[len(printed):])
                sys.stdout.flush()
                printed = text
        except ValueError as e:  # e.g. the conversation outgrew max_model_len
            print(f"\nerror: {e}", file=sys.stderr)
            messages.pop()
            continue
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": printed})
    return 0


def _enable_in_reasoning(cfg: dict[str, Any] | None) -> bool:
    """``--structured-outputs-config``'s one key we read; others are an error (not silently ignored)."""
    cfg = cfg or {}
    extra = set(cfg) - {"enable_in_reasoning", "backend"}
    if extra or cfg.get("backend", "xgrammar") not in ("auto", "xgrammar"):
        raise SystemExit(f"--structured-outputs-config: unsupported {sorted(extra) or cfg.get('backend')} "
                         "(enable_in_reasoning, and backend xgrammar, are supported)")
    return bool(cfg.get("enable_in_reasoning", False))


def cmd_serve(a: argparse.Namespace) -> int:
    import signal
    import threading

    import uvicorn

    from fastinfer.engine.async_engine import AsyncLLMEngine
    from fastinfer.entrypoints.openai_server import ServerConfig, build_app

    llm = _llm(a)
    template = a.chat_template
    if template is not None and Path(template).is_file():
        template = Path(template).read_text(encoding="utf-8")
    cfg = ServerConfig(served_model_name=a.served_model_name or a.model, api_key=a.api_key,
                       max_body_bytes=a.max_body_bytes, max_n=a.max_n, max_pending=a.max_pending,
                       shutdown_timeout=a.shutdown_timeout, chat_template=template,
                       tool_call_parser=a.tool_call_parser, reasoning_parser=a.reasoning_parser,
                       enable_in_reasoning=_enable_in_reasoning(a.structured_outputs_config),
                       generation_config=a.generation_config)
    # the engine steps in this thread, which built the model (see fastinfer.engine.async_engine: a second
    # torch thread costs every op an OpenMP wake-up on CPU); HTTP runs in a thread of its own
    aeng = AsyncLLMEngine(llm.engine, cfg.max_pending, thread=False)
    server = uvicorn.Server(uvicorn.Config(build_app(llm.engine, cfg, aeng), host=a.host, port=a.port,
                                           log_level="warning" if not a.verbose else "info",
                                           timeout_graceful_shutdown=int(a.shutdown_timeout)))
    http = threading.Thread(target=server.run, name="fastinfer-http", daemon=True)
    previous = {sig: signal.signal(sig, server.handle_exit)  # graceful; a second ^C forces
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        http.start()
        aeng.run(until=lambda: not http.is_alive())  # the lifespan's shutdown (after draining) also ends it
        http.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        llm.shutdown()  # tensor parallelism: stop the other ranks
    return 0 if server.started else 1


def _calibrated(a: argparse.Namespace, spec: QuantSpec) -> tuple[LoadedModel, dict[str, Any]]:
    """Load the float model and quantize it with the calibrated recipe (fastinfer.quantization.calibrate)."""
    from fastinfer.models.loader import load_model, resolve_dtype
    from fastinfer.ops import OpSet
    from fastinfer.quantization import get_method
    from fastinfer.quantization.calibrate import calibrated_quantize

    assert spec.method is not None
    if not get_method(spec.method).supports_calibration:
        raise ValueError(f"--calibrate does not support --quantization {a.quantization} (use int8 or int4[-gN])")
    text = None if a.calibration_text is None else Path(a.calibration_text).read_text(encoding="utf-8")
    # Calibration runs in float32 (rotated weights, Hessians and the distillation targets all lose accuracy in
    # 16 bits); the float tensors (embedding, norms) are saved in --dtype afterwards.
    loaded = load_model(a.model, "float32", OpSet("cpu", "torch"), progress=sys.stderr.isatty())
    info = calibrated_quantize(loaded.model, loaded.tokenizer, spec.method, spec.group_size,
                               rotate=not a.no_rotate, tune_steps=a.tune_steps, seed=a.seed, text=text,
                               num_tokens=a.calibration_tokens)
    target = resolve_dtype(a.dtype, "float32")
    # the float tensors; quantized layers hold buffers, kept as they are
    for param in loaded.model.parameters():  # type: ignore[attr-defined]
        param.data = param.data.to(target)
    loaded.dtype = target
    return loaded, info


def cmd_quantize(a: argparse.Namespace) -> int:
    from fastinfer.models.loader import load_model, save_quantized
    from fastinfer.ops import OpSet
    from fastinfer.quantization import parse_method

    spec = parse_method(a.quantization)  # the method's own parse: QuantSpec(method, group size)
    if spec.method is None:
        raise ValueError("quantize needs --quantization (int8, int4, int4-g32/64/128 or gguf)")
    info = None
    if not a.calibrate:  # the method creates (or, for GGUF files, keeps) the weights at load
        loaded = load_model(a.model, a.dtype, OpSet("cpu", "torch"), progress=sys.stderr.isatty(),
                            quantization=a.quantization)
    else:
        loaded, info = _calibrated(a, spec)
    save_quantized(loaded, a.output, a.quantization, calibration=info)
    print(f"saved {a.model} ({a.quantization}) to {a.output}")
    return 0


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"want a positive integer, got {v}")
    return v


def _non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want a number >= 0, got {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"want a finite number >= 0, got {text!r}")
    return v


def _prompts_file(path: str) -> list[str]:
    from fastinfer.verify import load_prompts

    try:
        return load_prompts(path)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_verify(a: argparse.Namespace) -> int:
    from fastinfer.verify import DEFAULT_PROMPTS, format_report, verify

    llm = _llm(a)
    settings = {"quantization": a.quantization, "speculative_config": a.speculative_config}
    report = verify(llm, a.model, a.prompts or list(DEFAULT_PROMPTS), a.max_new_tokens, a.max_kl, settings)
    print(json.dumps(report.to_dict()) if a.json else format_report(report))
    return 0 if report.passed else 1


def cmd_distill(a: argparse.Namespace) -> int:
    from fastinfer.distill.run import distill  # torch: imported only for this command

    distill(a)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fastinfer", description="Fast LLM inference: generate, chat, serve.")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="print the completion of one prompt (streamed)")
    _add_engine_args(g)
    g.add_argument("prompt", help="the prompt text")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_sampling_args(g, 128)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="interactive chat in the terminal (streamed)")
    _add_engine_args(c)
    c.add_argument("--system", default=None, help="system prompt")
    _add_sampling_args(c, 512)
    c.set_defaults(func=cmd_chat)
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    _add_engine_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health")
    s.add_argument("--served-model-name", default=None)
    s.add_argument("--max-body-bytes", type=int, default=1 << 20)
    s.add_argument("--max-n", type=int, default=16)
    s.add_argument("--max-pending", type=int, default=256, help="requests queued beyond max-num-seqs; then 429")
    s.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds to drain on SIGTERM")
    s.add_argument("--chat-template", default=None, help="a Jinja chat template (file or text) instead of the "
                   "tokenizer's")
    s.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                   help="parse tool calls from the output for tool_choice auto (default: the format the chat "
                   "template's markers name, if any)")
    s.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted for vLLM compatibility: tool_choice auto works whenever a parser is set or detected")
    s.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                   help="split <think> reasoning into message.reasoning (and reasoning_content)")
    s.add_argument("--structured-outputs-config", type=json.loads, default=None,
                   help='JSON, vLLM\'s: {"enable_in_reasoning": true} applies output constraints from the first '
                   "token even when the output starts inside a reasoning block (default: after it)")
    s.add_argument("--generation-config", default="auto",
                   help="auto: request defaults (temperature, top_p, top_k, min_p, repetition_penalty, "
                   "max_new_tokens) from the model directory's generation_config.json; vllm: built-in defaults; "
                   "or a folder holding a generation_config.json")
    s.set_defaults(func=cmd_serve, max_num_seqs=64)
    v = sub.add_parser("verify", help="compare the model under these settings with HF transformers (KL, top-k "
                       "agreement, greedy divergence)")
    _add_engine_args(v)
    v.add_argument("--prompts", type=_prompts_file, default=None, metavar="FILE",
                   help="one prompt per line, or a .jsonl file of strings / {\"prompt\": ...} (default: 5 built-in)")
    v.add_argument("--max-new-tokens", type=_positive_int, default=32, help="greedy tokens generated per prompt")
    v.add_argument("--max-kl", type=_non_negative_float, default=None,
                   help="exit with status 1 when the mean KL(HF || ours) over all positions exceeds this")
    v.add_argument("--json", action="store_true", help="print the report as one JSON object")
    v.set_defaults(func=cmd_verify)
    q = sub.add_parser("quantize", help="quantize a model's weights and save them (safetensors) for fast reloads")
    q.add_argument("model", help="HF directory, .gguf file or short name")
    q.add_argument("--quantization", "-q", required=True, help="int8 | int4 | int4-g32 | int4-g64 | int4-g128 | gguf")
    q.add_argument("--output", "-o", required=True, help="directory to write (config.json, model.safetensors, "
                   "tokenizer)")
    q.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the float tensors kept (embeddings, norms) and of the activations")
    q.add_argument("--calibrate", action="store_true",
                   help="calibrated instead of round-to-nearest: rotation, GPTQ, then group scales tuned by "
                   "distillation from the float model (minutes on CPU; see fastinfer.quantization.calibrate)")
    q.add_argument("--calibration-text", default=None, help="UTF-8 text file (default: CPython docs shipped with "
                   "Python, pydoc_data)")
    q.add_argument("--calibration-tokens", type=int, default=16384)
    q.add_argument("--tune-steps", type=int, default=24, help="distillation steps of 2 x 512 tokens (0: GPTQ only)")
    q.add_argument("--no-rotate", action="store_true", help="skip the Hadamard rotation before GPTQ")
    q.add_argument("--seed", type=int, default=0, help="seed of the random rotation")
    q.add_argument("-v", "--verbose", action="store_true")
    q.set_defaults(func=cmd_quantize)
    di = sub.add_parser("distill", help="train a draft model for speculative decoding from the served model "
                        "(teacher data through the engine, acceptance measured by the engine)")
    add_distill_arguments(di)
    di.add_argument("-v", "--verbose", action="store_true")
    di.set_defaults(func=cmd_distill)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command == "generate" and args.prompt is None:
        ap.error("generate needs a prompt")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
