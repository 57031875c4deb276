"""The offline API, shaped like vLLM's: ``LLM(model, **engine_args).generate(prompts, sampling_params)``."""
from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from tqdm.auto import tqdm

from fastinfer.beam_search import (
    BeamSearchOutput,
    BeamSearchParams,
    BeamSearchSequence,
    beam_score,
    select_beams,
)
from fastinfer.config import DEFAULT_MODEL, EngineConfig, generation_defaults
from fastinfer.engine.llm_engine import LLMEngine, PromptType
from fastinfer.outputs import CompletionOutput, RequestOutput
from fastinfer.sampling_params import MAX_LOGPROBS, SamplingParams

logger = logging.getLogger("fastinfer")
Messages = list[dict[str, str]]
_ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)} - {"model", "extra"}


class LLM:
    """Load a model and generate. ``model`` is an HF directory, a ``.gguf`` file or a short name
    (``smollm2-135m``); keyword arguments are :class:`EngineConfig` fields (vLLM names: ``dtype``,
    ``max_model_len``, ``max_num_seqs``, ``enable_prefix_caching``, ``block_size``, ...)."""

    def __init__(self, model: str = DEFAULT_MODEL, **kwargs: Any) -> None:
        known = {k: v for k, v in kwargs.items() if k in _ENGINE_FIELDS}
        extra = {k: v for k, v in kwargs.items() if k not in _ENGINE_FIELDS}
        self.engine = LLMEngine(EngineConfig(model=model, extra=extra, **known))
        self._ids = itertools.count()
        self._defaults: dict[str, Any] | None = None  # from generation_config.json, read on first use

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def worker_pids(self) -> list[int]:
        """Process ids of the tensor-parallel worker ranks (``tensor_parallel_size > 1``; [] otherwise)."""
        return self.engine.worker_pids()

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes now (they also stop when this LLM is garbage collected and
        at interpreter exit); the LLM cannot generate afterwards."""
        self.engine.shutdown()

    def get_default_sampling_params(self) -> SamplingParams:
        """The sampling parameters ``generate`` uses when given none: the model's ``generation_config.json``
        defaults (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens) over the built-in ones,
        as vLLM's ``generation_config="auto"``; ``generation_config="vllm"`` gives the built-in ones."""
        if self._defaults is None:
            cfg = self.engine.config
            self._defaults = generation_defaults(cfg.model, cfg.generation_config)
        return SamplingParams(**self._defaults)

    def reset_prefix_cache(self) -> bool:
        """Drop all cached KV blocks (between benchmark passes, say); False while requests are running."""
        return self.engine.kv.reset_cache()

    def prompt_logits(self, prompt: PromptType) -> Any:
        """Full-vocabulary next-token logits at every position of one prompt (text, token ids or a prompt
        dict), teacher-forced through the served model with this engine's settings (dtype, quantization,
        attention backend, paged KV cache): a float32 CPU tensor [T, vocab], for comparing against a reference
        (``fastinfer verify``). Raw logits, before any sampling parameter; call it between generate calls."""
        return self.engine.prompt_logits(prompt)

    def _next_id(self) -> str:
        return f"llm-{next(self._ids)}"

    @staticmethod
    def _as_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts):
            return [list(prompts)]  # one tokenized prompt
        return list(prompts)  # type: ignore[arg-type]

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt (text, token ids, or ``{"prompt_token_ids": [...]}``), all batched
        together; one SamplingParams for all or one per prompt. Returns outputs in prompt order. A prompt
        that cannot be served (empty, too long, bad ids) gets an output with ``error`` set and
        ``finish_reason="error"``; the others are unaffected."""
        plist = self._as_list(prompts)
        params = self._params(sampling_params, len(plist))
        results: dict[str, RequestOutput] = {}
        order = []
        for p, sp in zip(plist, params):
            rid = self._next_id()
            order.append(rid)
            try:
                self.engine.add_request(rid, p, sp)
            except ValueError as e:
                logger.warning("request %s rejected: %s", rid, e)
                results[rid] = _error_output(rid, p, sp, str(e))
        bar = tqdm(total=len(plist), desc="generating", unit="req", disable=not use_tqdm, leave=False)
        bar.update(len(results))
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [results[r] for r in order]

    def chat(self, messages: Messages | Sequence[Messages],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template: str | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        if not messages:
            raise ValueError("messages is empty")
        convs = [messages] if isinstance(messages[0], dict) else list(messages)  # type: ignore
        prompts = [self.chat_prompt(c, add_generation_prompt, chat_template) for c in convs]  # type: ignore
        return self.generate(prompts, sampling_params, use_tqdm)

    def chat_prompt(self, messages: Messages, add_generation_prompt: bool = True,
                    chat_template: str | None = None) -> dict[str, Any]:
        """``{"prompt": text, "prompt_token_ids": ids}`` for a conversation, via the chat template."""
        if not messages:
            raise ValueError("messages is empty")
        text = self.engine.tokenizer.apply_chat_template(messages, tokenize=False, chat_template=chat_template,
                                                         add_generation_prompt=add_generation_prompt)
        return {"prompt": text, "prompt_token_ids": self.engine.tokenizer.encode(text, add_special_tokens=False)}

    def stream(self, prompt: PromptType, sampling_params: SamplingParams | None = None,
               ) -> Iterator[RequestOutput]:
        """Yield the (cumulative) output of one prompt after every step it advances; the last is final.
        Other requests may run in the same engine meanwhile."""
        rid = self._next_id()
        self.engine.add_request(rid, prompt, sampling_params)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(rid)

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams,
                    ) -> list[BeamSearchOutput]:
        """Beam search for each prompt (deterministic); returns ``beam_width`` sequences per prompt, best first."""
        eng = self.engine
        eos = () if params.ignore_eos else eng.eos_token_ids
        outputs = []
        for prompt in self._as_list(prompts):
            _, ids = eng.tokenize_prompt(prompt)
            if not ids or len(ids) + params.max_tokens > eng.max_model_len:
                raise ValueError(f"prompt of {len(ids)} tokens plus max_tokens={params.max_tokens} does not fit "
                                 f"max_model_len={eng.max_model_len}")
            live = [BeamSearchSequence([])]
            done: list[BeamSearchSequence] = []
            step = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True,
                                  logprobs=min(2 * params.beam_width, MAX_LOGPROBS))
            for _ in range(params.max_tokens):
                outs = self.generate([{"prompt_token_ids": ids + b.tokens} for b in live], step, use_tqdm=False)
                cands = [BeamSearchSequence(b.tokens + [t], b.cum_logprob + lp.logprob)
                         for b, o in zip(live, outs) for t, lp in (o.outputs[0].logprobs or [{}])[0].items()]
                live, finished = select_beams(cands, params.beam_width, eos, params.ignore_eos)
                done += finished
                if not live:
                    break
            seqs = done + live
            for s in seqs:
                s.score = beam_score(len(ids), s, eos, params.length_penalty)
                s.text = eng.tokenizer.decode(s.tokens, skip_special_tokens=True)
            outputs.append(BeamSearchOutput(sorted(seqs, key=lambda s: -s.score)[:params.beam_width]))
        return outputs

    def _params(self, sp: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
        if sp is None:
            return [self.get_default_sampling_params()] * n
        if isinstance(sp, SamplingParams):
            return [sp] * n
        if len(sp) != n:
            raise ValueError(f"got {len(sp)} SamplingParams for {n} prompts")
        return list(sp)


def _error_output(rid: str, prompt: Any, sp: SamplingParams, message: str) -> RequestOutput:
    outs = [CompletionOutput(i, "", [], finish_reason="error") for i in range(sp.n)]
    text = prompt if isinstance(prompt, str) else (prompt.get("prompt") if isinstance(prompt, dict) else None)
    return RequestOutput(rid, text, [], outs, finished=True, error=message)
