"""The CLI prints the same completion as the offline API and reports bad input cleanly."""
import subprocess
import sys

from fastinfer import SamplingParams


def _cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "fastinfer", *args], capture_output=True, text=True,
                          input=stdin, timeout=300)


def test_generate_matches_llm(tiny_model_dir, tiny_llm):
    path = tiny_model_dir("llama")
    want = tiny_llm("llama").generate("Hello there", SamplingParams(temperature=0, max_tokens=8),
                                      use_tqdm=False)[0].outputs[0].text
    r = _cli("generate", path, "Hello there", "--max-tokens", "8", "--dtype", "float32", "--max-model-len", "512")
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"


def test_chat_streams_and_quits_on_empty_line(tiny_model_dir):
    r = _cli("chat", tiny_model_dir("llama"), "--max-tokens", "4", "--max-model-len", "512", stdin="hi\n\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_bad_arguments_exit_cleanly(tiny_model_dir):
    r = _cli("generate", tiny_model_dir("llama"), "hi", "--temperature", "-1", "--max-model-len", "512")
    assert r.returncode == 2 and "temperature" in r.stderr and "Traceback" not in r.stderr
    r = _cli("generate", "/no/such/model", "hi")
    assert r.returncode == 2 and "not a known short name" in r.stderr


def test_speculative_config_flag_gives_identical_greedy_output(tiny_model_dir):
    path = tiny_model_dir("llama")
    args = ["generate", path, "1 2 3 1 2 3 1 2", "--max-tokens", "12", "--dtype", "float32", "--max-model-len", "512"]
    plain = _cli(*args)
    spec = _cli(*args, "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}')
    assert plain.returncode == spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout
    bad = _cli(*args, "--speculative-config", '{"method": "medusa"}')
    assert bad.returncode == 2 and "not supported" in bad.stderr
