"""``fastinfer verify``: the command's report on the real SmolLM2 GGUF (float32: no divergence and a passing
--max-kl; int4: the measured KL, float32 rounding since the file's Q4_1 bits are kept), on tiny HF directories
(n-gram speculation identical; int4 from float weights: a positive KL failing --max-kl), its JSON and text
output, and argparse-style errors for bad arguments."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from fastinfer.entrypoints.cli import main
from fastinfer.verify import first_divergence, position_stats

# float32 against float32: the logits differ only by summation-order rounding (relative ~1e-6), so the KL,
# about half the variance of the logit difference, is orders of magnitude below this
FP32_KL = 1e-6


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("verify") / "prompts.txt"
    path.write_text("The capital of France is\nOnce upon a time, in a small village by the sea,\n")
    return str(path)


def run(*argv: str) -> tuple[int, str]:
    """Exit status and stdout of ``fastinfer verify ARGV`` (in-process: the HF reference is loaded once)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["verify", *argv])
    return rc, out.getvalue()


def run_json(*argv: str) -> tuple[int, dict]:
    rc, out = run(*argv, "--json")
    return rc, json.loads(out)


def assert_identical(report: dict, num_prompts: int, max_new_tokens: int) -> None:
    s = report["summary"]
    assert s["num_prompts"] == num_prompts == len(report["prompts"])
    assert s["num_diverged"] == 0 and s["first_divergence"] is None
    assert s["top1_agreement"] == 1.0 and s["top5_agreement"] == 1.0
    assert 0.0 <= s["mean_kl"] <= s["max_kl"] <= FP32_KL
    for p in report["prompts"]:
        assert p["first_divergence"] is None and p["tokens"] == p["hf_tokens"]
        assert len(p["tokens"]) == max_new_tokens
        assert p["num_positions"] == p["num_prompt_tokens"] + max_new_tokens


# -- the real SmolLM2 GGUF (HF loads it once for the module: load_reference keeps it) ---------------------------

@pytest.fixture(scope="module")
def smollm2(smollm2_path, prompts_file):
    """``fastinfer verify smollm2-135m`` with these settings: (exit status, stdout)."""
    def verify(*settings: str) -> tuple[int, str]:
        return run("smollm2-135m", "--prompts", prompts_file, "--max-new-tokens", "8", "--max-model-len", "128",
                   *settings)

    return verify


def test_smollm2_float32_reports_no_divergence_and_passes_max_kl(smollm2):
    rc, out = smollm2("--dtype", "float32", "--max-kl", str(FP32_KL))
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith("fastinfer verify: smollm2-135m (dtype=float32")
    rows = [ln.split() for ln in lines[2:-1]]
    assert [r[0] for r in rows] == ["1", "2", "all"]
    for r in rows:  # tokens, mean KL, max KL, top-1, top-5, diverge
        assert 0.0 <= float(r[2]) <= float(r[3]) <= FP32_KL
        assert r[4:7] == ["1.000", "1.000", "-"]
    assert lines[-1].startswith("PASS: mean KL") and "<= --max-kl 1e-06" in lines[-1]


def test_smollm2_int4_reports_its_kl_the_q4_1_import_is_lossless(smollm2):
    # the file's projections are Q4_1 (its embedding Q8_0): int4 keeps those bits rather than re-quantizing,
    # and HF dequantizes the same bits, so the measured KL is float32 rounding
    rc, out = smollm2("--dtype", "float32", "--quantization", "int4", "--json")
    report = json.loads(out)
    assert rc == 0 and report["max_kl"] is None and report["settings"]["quantization"] == "int4"
    assert_identical(report, 2, 8)


# -- tiny HF models (a directory: HF loads it with from_pretrained) ---------------------------------------------

def test_tiny_hf_directory_with_ngram_speculation_matches(tiny_model_dir, prompts_file):
    path = tiny_model_dir("llama")
    rc, report = run_json(path, "--prompts", prompts_file, "--max-new-tokens", "12", "--max-model-len",
                          "128", "--dtype", "float32",
                          "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}')
    assert rc == 0 and report["max_kl"] is None
    assert_identical(report, 2, 12)
    assert report["settings"]["speculative_config"]["method"] == "ngram"


def test_tiny_int4_reports_a_positive_kl_and_fails_max_kl_below_it(tiny_model_dir, prompts_file):
    rc, report = run_json(tiny_model_dir("llama"), "--prompts", prompts_file, "--max-new-tokens", "4",
                          "--max-model-len", "64", "--dtype", "float32", "--quantization", "int4",
                          "--max-kl", str(FP32_KL))
    s = report["summary"]
    assert report["settings"]["quantization"] == "int4"
    assert s["mean_kl"] > 100 * FP32_KL  # round-to-nearest from the float32 weights: lossy
    assert all(p["max_kl"] >= p["mean_kl"] > 0 for p in report["prompts"])
    assert s["mean_kl"] == pytest.approx(sum(p["mean_kl"] * p["num_positions"] for p in report["prompts"])
                                         / s["num_positions"], rel=1e-9)
    assert rc == 1 and not report["passed"] and report["max_kl"] == FP32_KL


def test_jsonl_prompts_and_default_prompts(tiny_model_dir, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('"Hello there"\n\n{"prompt": "The quick brown fox"}\n')
    rc, report = run_json(tiny_model_dir("qwen2"), "--prompts", str(f), "--max-new-tokens", "4",
                          "--max-model-len", "64", "--dtype", "float32")
    assert rc == 0 and [p["prompt"] for p in report["prompts"]] == ["Hello there", "The quick brown fox"]
    assert_identical(report, 2, 4)
    from fastinfer.verify import DEFAULT_PROMPTS

    rc, report = run_json(tiny_model_dir("qwen2"), "--max-new-tokens", "2", "--max-model-len", "64",
                          "--dtype", "float32")
    assert rc == 0 and [p["prompt"] for p in report["prompts"]] == list(DEFAULT_PROMPTS)


def test_llm_prompt_logits_is_the_served_models_and_leaves_the_engine_serving(tiny_llm):
    from fastinfer import SamplingParams

    llm = tiny_llm("llama", max_model_len=64)
    ids = llm.get_tokenizer().encode("The quick brown fox jumps over the lazy dog")
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    before = llm.generate([ids], sp, use_tqdm=False)[0].outputs[0].token_ids  # its blocks now in the prefix cache
    seq = ids + list(before)
    logits = llm.prompt_logits(seq)
    assert logits.dtype == torch.float32 and logits.shape == (len(seq), llm.engine.model_config.vocab_size)
    # teacher-forced over our own greedy tokens: each row's argmax is the token generated after it
    assert logits[len(ids) - 1:-1].argmax(-1).tolist() == list(before)
    assert torch.equal(llm.prompt_logits({"prompt_token_ids": seq}), logits)
    assert llm.generate([ids], sp, use_tqdm=False)[0].outputs[0].token_ids == before
    with pytest.raises(ValueError, match="max_model_len=64"):
        llm.prompt_logits(list(range(1, 66)))


# -- the statistics themselves -----------------------------------------------------------------------------------

def test_position_stats_against_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(7, 50, generator=g) * 3
    ours = ref + 0.5 * torch.randn(7, 50, generator=g)
    s = position_stats(ref, ours)
    p, q = torch.softmax(ref.double(), -1), torch.softmax(ours.double(), -1)
    assert torch.allclose(s["kl"], (p * (p / q).log()).sum(-1), rtol=1e-10, atol=1e-14)
    assert s["top1"].tolist() == (ref.argmax(-1) == ours.argmax(-1)).double().tolist()
    overlap = [len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(ref.topk(5).indices, ours.topk(5).indices)]
    assert s["top5"].tolist() == pytest.approx(overlap)
    same = position_stats(ref, ref.clone())
    assert same["kl"].max().item() == 0.0 and same["top1"].min().item() == 1.0
    with pytest.raises(ValueError, match="vocabularies"):
        position_stats(ref, ours[:, :40])


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 9, 3], [1, 2, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2


# -- bad arguments: argparse errors, exit status 2, nothing loaded -----------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens: want a positive integer, got 0"),
    (["--max-new-tokens", "x"], "want a positive integer, got 'x'"),
    (["--max-kl", "-1"], "--max-kl: want a finite number >= 0"),
    (["--max-kl", "nan"], "--max-kl: want a finite number >= 0"),
    (["--prompts", "/nonexistent/prompts.txt"], "No such file"),
    (["--speculative-config", "{bad"], "--speculative-config"),
])
def test_bad_arguments_exit_2_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["verify", "smollm2-135m", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: fastinfer verify" in err and message in err


@pytest.mark.parametrize("content, message", [
    ("\n  \n", "no prompts"),
    ('"ok"\n{"text": 1}\n', ":2: want a non-empty JSON string"),
    ('"ok"\nnot json\n', ":2: not JSON"),
])
def test_bad_prompt_files_exit_2(content, message, tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    with pytest.raises(SystemExit) as e:
        main(["verify", "smollm2-135m", "--prompts", str(f)])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_unknown_and_fastinfer_quantized_models_are_clear_errors(tiny_model_dir, tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nothing")]) == 2
    assert "not a known short name" in capsys.readouterr().err
    saved = str(tmp_path / "int8")
    assert main(["quantize", tiny_model_dir("llama"), "-q", "int8", "-o", saved]) == 0
    capsys.readouterr()
    assert main(["verify", saved, "--max-model-len", "64"]) == 2
    assert "HF transformers cannot read: verify the float model with --quantization int8" in capsys.readouterr().err
