"""The scheduler's step plan as bytes, for the tensor-parallel ranks: JSON of plain data (ids, token lists,
block ids, sampling parameters), never pickle, since prompts and parameters come from clients. Decoding
rebuilds the dataclasses and re-validates the sampling parameters."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from fastinfer.core.outputs import NewRequestData, SchedulerOutput
from fastinfer.sampling_params import SamplingParams


def _params(p: SamplingParams) -> dict[str, Any]:
    d = {f.name: getattr(p, f.name) for f in dataclasses.fields(p) if f.init}
    if p.structured_outputs is not None:
        d["structured_outputs"] = dataclasses.asdict(p.structured_outputs)
    if p.logit_bias is not None:
        d["logit_bias"] = [[int(k), float(v)] for k, v in p.logit_bias.items()]
    return d


def _unparams(d: dict[str, Any]) -> SamplingParams:
    if d.get("logit_bias") is not None:
        d["logit_bias"] = {int(k): v for k, v in d["logit_bias"]}
    return SamplingParams(**d)


def encode_scheduler_output(s: SchedulerOutput) -> bytes:
    new = [{"req_id": r.req_id, "prompt_token_ids": r.prompt_token_ids, "output_token_ids": r.output_token_ids,
            "sampling_params": _params(r.sampling_params), "sample_index": r.sample_index,
            "eos_token_ids": list(r.eos_token_ids), "cache_salt": r.cache_salt} for r in s.new_reqs]
    doc = {"req_ids": s.req_ids, "num_scheduled_tokens": s.num_scheduled_tokens,
           "num_computed_tokens": s.num_computed_tokens, "block_ids": [list(b) for b in s.block_ids],
           "new_reqs": new, "spec_token_ids": s.spec_token_ids, "preempted_req_ids": s.preempted_req_ids,
           "finished_req_ids": s.finished_req_ids, "blocks_to_copy": [list(c) for c in s.blocks_to_copy]}
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_scheduler_output(data: bytes) -> SchedulerOutput:
    d = json.loads(data)
    new = [NewRequestData(r["req_id"], r["prompt_token_ids"], r["output_token_ids"],
                          _unparams(r["sampling_params"]), r["sample_index"], tuple(r["eos_token_ids"]),
                          r["cache_salt"]) for r in d["new_reqs"]]
    return SchedulerOutput(d["req_ids"], d["num_scheduled_tokens"], d["num_computed_tokens"],
                           [tuple(b) for b in d["block_ids"]], new, d["spec_token_ids"], d["preempted_req_ids"],
                           d["finished_req_ids"], [(g, a, b) for g, a, b in d["blocks_to_copy"]])
