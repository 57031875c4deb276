"""The worker owns the device: it picks it, loads the model (and a draft model) straight onto it, sizes and
allocates the KV cache, builds the op set, and owns the model runner and the speculative proposer. The engine
talks to it only through plain data: :class:`WorkerInfo` once, then ``execute(SchedulerOutput) ->
ModelRunnerOutput`` every step."""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fastinfer.config import EngineConfig, SpeculativeConfig
from fastinfer.core.outputs import ModelRunnerOutput, SchedulerOutput
from fastinfer.distributed.communication import all_reduce_min
from fastinfer.distributed.parallel_state import tp_rank, tp_size
from fastinfer.models.interface import CausalLM, allocate_kv_caches, forward_sequence, moe_blocks, scratch_kv_cache
from fastinfer.models.loader import LoadedModel, load_model
from fastinfer.ops import OpSet
from fastinfer.sampling_params import StructuredOutputsParams
from fastinfer.structured_output import GrammarCompiler
from fastinfer.worker.decode_graphs import DecodeGraphs, capture_sizes
from fastinfer.worker.draft_model import DraftModelProposer
from fastinfer.worker.kv_cache import plan_kv_cache
from fastinfer.worker.model_runner import ModelRunner
from fastinfer.worker.spec_decode import NgramProposer, Proposer, Speculator

logger = logging.getLogger("fastinfer")


def select_device(device: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU. ``cuda`` without a usable GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but no CUDA device is available to this torch "
                         f"({torch.__version__}); use device='cpu' or 'auto'")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return dev


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a container's cpuset, ``taskset``), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def fit_cpu_threads() -> int:
    """torch's intra-op threads capped at :func:`usable_cpus` (torch counts the host's cores, so in a container
    limited to fewer CPUs its default oversubscribes them); a lower count set by the user stays. Returns it."""
    n, usable = torch.get_num_threads(), usable_cpus()
    if n > usable:
        torch.set_num_threads(usable)
        logger.info("CPU threads: %d (this process may use %d CPUs; torch had %d)", usable, usable, n)
    return torch.get_num_threads()


@dataclass(frozen=True)
class WorkerInfo:
    """What the engine needs to know of the loaded model and the cache, as plain data."""

    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_model_len: int
    num_kv_blocks: int  # of the first KV cache group (the only one without sliding-window groups)
    num_lookahead_tokens: int  # slots the scheduler reserves past a request's tokens for draft-model KV
    device: str
    dtype: str
    load_seconds: float
    kv_group_windows: tuple[int | None, ...] = (None,)  # sliding window of each KV cache group
    kv_group_blocks: tuple[int, ...] = ()  # blocks of each group's pool


class Worker:
    """One device's worker. Under tensor parallelism (``tp_size() > 1``, set by the executor) it is one rank:
    it loads its shards, then calls ``join(backend)`` to join the process groups, and every rank takes the
    smallest KV block counts of all ranks (so the scheduler's plan fits every rank)."""

    def __init__(self, config: EngineConfig, join: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.device = select_device(config.device)
        if tp_size() > 1:
            self._place_rank()
        elif self.device.type == "cpu":
            fit_cpu_threads()
        self.ops = OpSet(self.device.type, config.attention_backend)
        loaded = load_model(config.model, config.dtype, self.ops, config.max_model_len, config.tokenizer,
                            config.load_progress, quantization=config.quantization, device=self.device,
                            model_impl=config.model_impl)
        if join is not None:
            join("nccl" if self.device.type == "cuda" else "gloo")
        self.loaded = loaded
        self.model, self.model_config, self.tokenizer = loaded.model, loaded.config, loaded.tokenizer
        self.max_model_len = config.max_model_len or loaded.config.max_position_embeddings
        self.spec = (SpeculativeConfig.from_dict(dict(config.speculative_config))
                     if config.speculative_config is not None else None)
        draft = self._load_draft(self.spec, loaded) if self.spec is not None else None
        spec = loaded.model.kv_cache_spec()
        self.kv_layout = plan_kv_cache(config, self.max_model_len, self.device, spec, loaded.dtype,
                                       None if draft is None else (draft.model.kv_cache_spec(), draft.dtype))
        if tp_size() > 1:
            self.kv_layout = dataclasses.replace(self.kv_layout,
                                                 num_blocks=tuple(all_reduce_min(list(self.kv_layout.num_blocks))))
        self.num_kv_blocks = self.kv_layout.num_blocks[0]
        if self._fp8_kv_on_torch():
            logger.warning("kv_cache_dtype fp8_e4m3 on the CPU: the C++ attention kernels do int8 KV only, so "
                           "store_kv and paged_attention run on the torch backend (dequantizing gathered rows)")
        bs = config.block_size
        kv = self.kv_layout.allocate(spec, bs, loaded.dtype, self.device, config.kv_cache_dtype)
        budget = config.max_num_batched_tokens or max(2048, config.max_num_seqs)
        self.proposer: Proposer | None = None
        if self.spec is not None and draft is None:
            self.proposer = NgramProposer(self.spec.prompt_lookup_max, self.spec.prompt_lookup_min)
        elif draft is not None:
            draft_kv = allocate_kv_caches(draft.model.kv_cache_spec(), self.num_kv_blocks, bs, draft.dtype,
                                          self.device, config.kv_cache_dtype)
            self.proposer = DraftModelProposer(draft.model, draft_kv, bs, self.device, config.seed, budget,
                                               config.enable_prefix_caching)
        speculator = None
        if self.spec is not None and self.proposer is not None:
            speculator = Speculator(self.spec, self.proposer, self.max_model_len)
        generator = torch.Generator(device=self.device).manual_seed(config.seed)
        eos = loaded.config.eos_token_ids or tuple(
            t for t in [getattr(self.tokenizer, "eos_token_id", None)] if t is not None)
        self.grammars = GrammarCompiler(self.tokenizer, loaded.config.vocab_size, eos)
        self.runner = ModelRunner(loaded.model, kv, bs, self.ops, self.device, generator, speculator, self.kv_layout,
                                  self.grammars)
        self.runner.decode_graphs = self._decode_graphs(self.model, *config.decode_mode())
        if isinstance(self.proposer, DraftModelProposer) and self.runner.decode_graphs is not None:
            self.proposer.decode_graphs = self._decode_graphs(self.proposer.model, *config.decode_mode(), "draft")
        ahead = (self.spec.num_speculative_tokens
                 if self.spec is not None and self.proposer is not None and self.proposer.needs_kv_slots else 0)
        self.info = WorkerInfo(loaded.config.vocab_size, eos, self.max_model_len, self.num_kv_blocks, ahead,
                               str(self.device), str(loaded.dtype).removeprefix("torch."), loaded.load_seconds,
                               self.kv_layout.windows, self.kv_layout.num_blocks)

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(sched)

    def decode_graph_runs(self, draft: bool = False) -> int:
        """Decode steps served by the fixed-size decode path (CUDA graphs / compiled / static) so far; 0 when
        decode runs eagerly. ``draft``: the draft model's single-token steps instead of the target's."""
        g = self.runner.decode_graphs if not draft else getattr(self.proposer, "decode_graphs", None)
        return 0 if g is None else g.num_runs

    def check_grammar(self, params: StructuredOutputsParams) -> None:
        """ValueError naming the problem when a structured-output constraint is invalid (parsing only: fast)."""
        self.grammars.check(params)

    def compile_grammar(self, params: StructuredOutputsParams) -> None:
        """Compile a constraint against the vocabulary into the grammar cache the model runner reads (slow for
        a large schema: the engine calls it off its step thread before it schedules the request)."""
        self.grammars.compile(params)

    def expert_load(self) -> dict[int, list[int]]:
        """Tokens routed to each expert so far, per MoE layer of the served model: {decoder layer index: [count
        per expert]} ({} for a dense model). Reads the layers' device counters (one copy each); meant for metric
        scrapes, not for every step."""
        names = {id(m): name for name, m in self.model.named_modules()}  # type: ignore[attr-defined]
        load: dict[int, list[int]] = {}
        for i, block in enumerate(moe_blocks(self.model)):
            counts = getattr(block, "expert_tokens", None)
            if isinstance(counts, torch.Tensor):
                load[_layer_index(names.get(id(block), ""), i)] = counts.tolist()
        return load

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Teacher-forced fp32 logits [n, vocab] (on the CPU) at every position of one whole sequence from
        position 0: the served model and op set, with a paged KV cache of its own (the engine's
        ``kv_cache_dtype`` and block size) for the call, so the engine's cache and its prefix cache stay
        untouched. For ``LLMEngine.prompt_logits``."""
        bs = self.config.block_size
        with scratch_kv_cache(self.model, len(token_ids), bs, self.config.kv_cache_dtype):
            hidden = forward_sequence(self.model, token_ids, bs)
            return self.model.compute_logits(hidden).float().cpu()

    # -- set-up --------------------------------------------------------------------------------------------
    def _fp8_kv_on_torch(self) -> bool:
        """An fp8 KV cache where the op set chose the C++ kernels, which take int8 KV only (the torch backend
        runs those calls)."""
        return self.config.kv_cache_dtype == "fp8_e4m3" and self.ops.chosen.get("paged_attention") == "cpp"

    def _place_rank(self) -> None:
        """A tensor-parallel rank's device (``cuda:LOCAL_RANK``) or its share of the host's CPUs."""
        local_rank = int(os.environ.get("LOCAL_RANK", tp_rank()))
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", tp_size()))
        if self.device.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise ValueError(f"tensor-parallel rank {tp_rank()} (local rank {local_rank}) has no GPU: this host "
                                 f"has {torch.cuda.device_count()}")
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            torch.set_num_threads(max(1, usable_cpus() // local_size))
            logger.info("tensor-parallel rank %d: %d CPU threads", tp_rank(), torch.get_num_threads())

    def _decode_graphs(self, model: CausalLM, mode: str, sizes: list[int] | None, what: str = "decode step",
                       ) -> DecodeGraphs | None:
        """The padded fixed-size decode step of ``model`` (the served model, or ``what="draft"`` the draft model,
        whose KV cache is bound already) in ``EngineConfig.decode_mode``, captured now; None (eager decode, logged
        with the reason) where it cannot run."""
        if mode == "auto":
            mode = "cuda_graph" if self.device.type == "cuda" else "eager"
        if mode != "eager" and tp_size() > 1:
            logger.warning("%s: %s asked for, running eager: not captured under tensor parallelism yet", what,
                           mode)
            mode = "eager"
        if mode == "eager":
            logger.info("%s: eager%s", what, " (enforce_eager)" if self.config.enforce_eager else "")
            return None
        why = None
        if self.ops.chosen.get("paged_attention") == "torch" or self._fp8_kv_on_torch():
            why = "the torch attention backend reads host-side lengths"
        elif len(self.kv_layout.windows) > 1:
            why = "several KV cache groups (sliding windows)"
        elif mode == "cuda_graph" and self.device.type != "cuda":
            why = "CUDA graphs need a CUDA device"
        if why is not None:
            logger.warning("%s: %s asked for, running eager: %s", what, mode, why)
            return None
        graphs = DecodeGraphs(model, self.device, mode, capture_sizes(self.config.max_num_seqs, sizes),
                              self.max_model_len, self.config.block_size, what, self.config.inductor_options())
        try:
            graphs.capture()
        except Exception as e:  # a host sync or an unsupported op inside the forward: say so, serve eagerly
            logger.warning("%s: %s failed (%s: %s); running eager", what, mode, type(e).__name__, e)
            return None
        return graphs

    def _load_draft(self, spec: SpeculativeConfig, target: LoadedModel) -> LoadedModel | None:
        """The draft model of ``method="draft_model"`` (the target itself, quantized, when no model is given),
        in the target's dtype; raises ValueError unless it shares the target's vocabulary and context."""
        if spec.method != "draft_model":
            return None
        name = self.config.model if spec.self_draft else spec.model
        assert name is not None
        dtype = str(target.dtype).removeprefix("torch.")
        try:
            draft = load_model(name, dtype, self.ops, self.max_model_len, None, self.config.load_progress,
                               quantization=spec.draft_quantization, device=self.device,
                               model_impl=self.config.model_impl if spec.self_draft else "auto")
        except ValueError as e:
            raise ValueError(f"speculative_config: cannot load the draft model {name!r}: {e}") from e
        tcfg, dcfg = target.config, draft.config
        if dcfg.vocab_size != tcfg.vocab_size:
            raise ValueError(f"speculative_config: the draft model {name!r} has a vocabulary of {dcfg.vocab_size} "
                             f"tokens, the target {tcfg.vocab_size}: a draft model must share the target's "
                             "tokenizer")
        if not spec.self_draft:
            tv, dv = _vocab(target.tokenizer), _vocab(draft.tokenizer)
            if tv is not None and dv is not None and tv != dv:
                raise ValueError(f"speculative_config: the draft model {name!r} has a different tokenizer "
                                 "(token ids map to other strings): a draft model must share the target's tokenizer")
        logger.info("speculative decoding: draft model %s%s, %d tokens per step", name,
                    f" ({spec.draft_quantization})" if spec.draft_quantization else "", spec.num_speculative_tokens)
        return draft


def _vocab(tokenizer: Any) -> dict[str, int] | None:
    get = getattr(tokenizer, "get_vocab", None)
    return get() if callable(get) else None


def _layer_index(module_name: str, default: int) -> int:
    """The decoder layer number in a module path (``model.layers.7.mlp`` -> 7), else ``default``."""
    parts = module_name.split(".")
    for a, b in zip(parts, parts[1:], strict=False):
        if a == "layers" and b.isdigit():
            return int(b)
    return default
