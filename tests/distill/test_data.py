"""Teacher data: the engine's per-token logprobs land on the right positions (equal to HF transformers' top-k
of the same sequence, and to the teacher scoring the sequence afterwards), on- and off-policy; the file format
round-trips and a corrupt or foreign file is a clear error; the prompt sources."""
from __future__ import annotations

import json

import pytest
import torch

from fastinfer import LLM
from fastinfer.distill import data as D
from tests.distill.tiny import VOCAB, make_teacher, random_prompts


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_teacher(str(tmp_path_factory.mktemp("teacher")), layer_scale=0.3)


@pytest.fixture(scope="module")
def llm(teacher):
    return LLM(teacher, dtype="float32", max_model_len=128, load_progress=False)


def _hf_topk(teacher: str, tokens: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([tokens])).logits[0].double(), -1)
    top = logp.topk(k, -1)
    return top.indices, top.values


def _check_record(teacher: str, r: D.Record, k: int) -> None:
    ids, lps = _hf_topk(teacher, r.tokens, k)
    rows = slice(r.target_start, len(r.tokens) - 1)
    assert r.topk_ids.shape == (len(r.tokens) - 1 - r.target_start, k)
    torch.testing.assert_close(r.topk_logprobs.double(), lps[rows], atol=2e-4, rtol=0)
    assert torch.equal(r.topk_ids.long(), ids[rows])


def test_off_policy_rows_are_the_teachers_next_token_distributions(teacher, llm):
    prompts = random_prompts(3, 5, seed=1)
    recs = D.generate_off_policy(llm, prompts, max_tokens=7, top_k=5, temperature=1.0, seed=2, use_tqdm=False)
    assert [r.tokens[:5] for r in recs] == prompts and all(r.prompt_len == 5 == r.target_start + 1 for r in recs)
    for r in recs:
        _check_record(teacher, r, 5)
    # the teacher scoring the same sequences afterwards (prompt_logprobs) gives the same rows
    scored = D.score(llm, [(r.tokens, r.prompt_len) for r in recs], top_k=5, use_tqdm=False)
    for a, b in zip(recs, scored):
        assert torch.equal(a.topk_ids, b.topk_ids) and a.target_start == b.target_start
        torch.testing.assert_close(a.topk_logprobs, b.topk_logprobs, atol=1e-4, rtol=0)  # fp32 sums
    full = D.generate_off_policy(llm, prompts[:1], max_tokens=4, top_k=5, score_prompt=True, use_tqdm=False)[0]
    assert full.target_start == 0
    _check_record(teacher, full, 5)


def test_on_policy_the_student_generates_and_the_teacher_scores(teacher, llm, tmp_path):
    student = LLM(make_teacher(str(tmp_path / "student"), seed=5), dtype="float32", max_model_len=128,
                  load_progress=False)
    recs = D.generate_on_policy(student, llm, random_prompts(2, 4, seed=3), max_tokens=6, top_k=4, use_tqdm=False)
    assert len(recs) == 2
    for r in recs:
        assert r.prompt_len == 4 and r.target_start == 3
        _check_record(teacher, r, 4)


def test_file_round_trip_and_validation(llm, tmp_path):
    recs = D.generate_off_policy(llm, random_prompts(3, 4, seed=4), max_tokens=5, top_k=3, temperature=1.0,
                                 use_tqdm=False)
    data = D.TeacherData(recs, 3, "off-policy", "tiny")
    path = str(tmp_path / "d.safetensors")
    D.save(path, data)
    back = D.load(path, VOCAB)
    assert (back.top_k, back.kind, back.teacher, len(back)) == (3, "off-policy", "tiny", 3)
    for a, b in zip(recs, back.records):
        assert (a.tokens, a.prompt_len, a.target_start) == (b.tokens, b.prompt_len, b.target_start)
        assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.topk_logprobs, b.topk_logprobs)
    with pytest.raises(ValueError, match=r"token ids outside \[0, 10\)"):
        D.load(path, vocab_size=10)

    from safetensors.torch import load_file, save_file
    meta = {"format": D.FORMAT, "version": D.VERSION, "top_k": "3", "kind": "x", "teacher": "y"}

    def tampered(name: str, fn, metadata=meta) -> str:
        t = load_file(path)
        t[name] = fn(t[name])
        p = str(tmp_path / f"bad-{name}.safetensors")
        save_file(t, p, metadata=metadata)
        return p

    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="cannot read it as safetensors"):
        D.load(str(tmp_path / "junk.safetensors"))
    with pytest.raises(ValueError, match="format"):
        D.load(tampered("tokens", lambda x: x, {"format": "other"}))
    with pytest.raises(ValueError, match="offsets"):
        D.load(tampered("offsets", lambda x: x.flip(0)))
    with pytest.raises(ValueError, match="repeats a top-k id"):
        D.load(tampered("topk_ids", lambda x: x[:, :1].repeat(1, 3)))
    with pytest.raises(ValueError, match="log-probabilities"):
        D.load(tampered("topk_logprobs", lambda x: x + 5))
    with pytest.raises(ValueError, match=r"must be \["):
        D.load(tampered("topk_ids", lambda x: x[1:]))
    with pytest.raises(ValueError, match="is torch.float64"):
        D.load(tampered("topk_logprobs", lambda x: x.double()))
    with pytest.raises(ValueError, match="top_k"):
        D.generate_off_policy(llm, [[2, 3]], max_tokens=2, top_k=21)


def test_prompt_sources(tmp_path, llm):
    a, b = D.builtin_prompts(6, seed=0), D.builtin_prompts(6, seed=0)
    assert a == b and a != D.builtin_prompts(6, seed=1)
    assert all(len(p["prompt"]) > 150 and p["messages"][0]["role"] == "user" for p in a)
    from pydoc_data.topics import topics
    assert not any(p["prompt"][:80] in "".join(topics.values()) for p in a)  # not the benchmark's corpus
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "t2 t3 t4"}) + "\n\n" + json.dumps({"messages": [
        {"role": "user", "content": "t5 t6"}]}) + "\n")
    got = D.prompts_from_file(str(f))
    assert D.encode_prompts(llm, got, 64, chat="never") == [[2, 3, 4], [5, 6]]
    f.write_text('{"prompt": 3}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: each line needs"):
        D.prompts_from_file(str(f))
    t = tmp_path / "p.txt"
    t.write_text("t2 t3\n\nt4 t5 t6\n")
    assert [p["prompt"] for p in D.prompts_from_file(str(t))] == ["t2 t3", "t4 t5 t6"]
