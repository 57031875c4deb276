"""Beam search on the engine's own machinery: every step extends each live beam by one token with a batch of
``max_tokens=1`` requests; the prefix cache turns each beam's shared history into cache hits, so a step
recomputes at most one partial block per beam. Scores follow HF/vLLM: ``cum_logprob / len ** length_penalty``
with ``len`` counting prompt and generated tokens (a final EOS not counted)."""
from __future__ import annotations

from dataclasses import dataclass, field

MAX_BEAM_WIDTH = 10  # each beam asks the engine for its 2 * width best next tokens (<= 20 logprobs)


@dataclass(frozen=True)
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.beam_width, int) or not 1 <= self.beam_width <= MAX_BEAM_WIDTH:
            raise ValueError(f"BeamSearchParams.beam_width must be in [1, {MAX_BEAM_WIDTH}], got {self.beam_width!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"BeamSearchParams.max_tokens must be >= 1, got {self.max_tokens!r}")


@dataclass
class BeamSearchSequence:
    tokens: list[int]  # generated tokens only
    cum_logprob: float = 0.0
    finished: bool = False
    text: str = ""
    score: float = 0.0


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence] = field(default_factory=list)  # best first


def beam_score(prompt_len: int, seq: BeamSearchSequence, eos_ids: tuple[int, ...], length_penalty: float) -> float:
    n = prompt_len + len(seq.tokens) - (1 if seq.tokens and seq.tokens[-1] in eos_ids else 0)
    return seq.cum_logprob / (n ** length_penalty)


def select_beams(candidates: list[BeamSearchSequence], width: int, eos_ids: tuple[int, ...],
                 ignore_eos: bool) -> tuple[list[BeamSearchSequence], list[BeamSearchSequence]]:
    """The ``width`` best candidates by cumulative logprob, split into (still live, just finished with EOS)."""
    best = sorted(candidates, key=lambda s: -s.cum_logprob)[:width]
    live, done = [], []
    for s in best:
        if not ignore_eos and s.tokens[-1] in eos_ids:
            s.finished = True
            done.append(s)
        else:
            live.append(s)
    return live, done
