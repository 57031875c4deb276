"""AsyncLLMEngine's two ways to step: its own background thread, or the caller's thread (``fastinfer serve``
steps in the main thread, which built the model; requests come from an event loop in another thread)."""
from __future__ import annotations

import asyncio
import threading

import pytest

from fastinfer import SamplingParams
from fastinfer.engine.async_engine import AsyncLLMEngine, EngineDeadError

PROMPTS = [[5, 9, 2, 7], [11, 3, 8], [4, 4, 6, 1, 2]]


def _finals(aeng: AsyncLLMEngine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    async def one(i: int, ids: list[int]) -> list[int]:
        final = None
        async for out in aeng.generate(f"r{i}", {"prompt_token_ids": ids}, params):
            final = out
        return final.outputs[0].token_ids

    async def all_of() -> list[list[int]]:
        return list(await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)]))

    return asyncio.run(all_of())


@pytest.mark.parametrize("own_thread", [True, False])
def test_outputs_equal_offline_and_steps_run_where_asked(tiny_llm, monkeypatch, own_thread):
    llm = tiny_llm("llama", max_num_seqs=4)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params,
                                                        use_tqdm=False)]
    stepped_on: set[int] = set()
    step = llm.engine.step

    def recording_step():
        stepped_on.add(threading.get_ident())
        return step()

    monkeypatch.setattr(llm.engine, "step", recording_step)
    aeng = AsyncLLMEngine(llm.engine, thread=own_thread)
    got: list = []
    if own_thread:
        got = _finals(aeng, PROMPTS, params)
        aeng.stop()
        assert threading.get_ident() not in stepped_on
    else:
        client = threading.Thread(target=lambda: got.extend(_finals(aeng, PROMPTS, params)))
        client.start()
        aeng.run(until=lambda: not client.is_alive())  # returns once the client thread has all its outputs
        client.join()
        assert stepped_on == {threading.get_ident()}
    assert got == want
    assert not aeng.alive


def test_caller_thread_loop_ends_and_fails_what_is_left(tiny_llm):
    llm = tiny_llm("llama", max_num_seqs=4)
    aeng = AsyncLLMEngine(llm.engine, thread=False)
    started = threading.Event()
    errors: list[BaseException] = []

    def client() -> None:
        async def go() -> None:
            try:
                async for _ in aeng.generate("long", {"prompt_token_ids": [3, 1, 4]},
                                             SamplingParams(max_tokens=400, ignore_eos=True)):
                    started.set()
            except EngineDeadError as e:
                errors.append(e)
        asyncio.run(go())

    t = threading.Thread(target=client)
    t.start()
    aeng.run(until=started.is_set)  # the owner ends the loop while a request is in flight
    t.join(30)
    assert len(errors) == 1 and "shut down" in str(errors[0])
    assert not aeng.alive
    with pytest.raises(EngineDeadError):
        asyncio.run(_add_one(aeng))


async def _add_one(aeng: AsyncLLMEngine) -> None:
    aeng.add_request("late", {"prompt_token_ids": [1, 2]}, SamplingParams(max_tokens=2))
