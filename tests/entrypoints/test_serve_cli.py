"""`fastinfer serve` as a real process: serves the official client, and SIGTERM drains in-flight work."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx

from tests.entrypoints.conftest import free_port


def test_sigterm_drains_in_flight_streams(tiny_model_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fastinfer", "serve", tiny_model_dir("llama"), "--port",
                             str(port), "--dtype", "float32", "--max-model-len", "512", "--shutdown-timeout", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline and proc.poll() is None, "server did not come up"
            time.sleep(0.2)
        import openai

        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert client.models.list().data[0].id == tiny_model_dir("llama")
        lines: list[str] = []
        got_first = threading.Event()

        def stream():
            body = {"prompt": "drain me", "max_tokens": 300, "stream": True, "ignore_eos": True, "temperature": 0}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                for ln in r.iter_lines():
                    if ln:
                        lines.append(ln)
                        got_first.set()

        t = threading.Thread(target=stream)
        t.start()
        assert got_first.wait(60)
        os.kill(proc.pid, signal.SIGTERM)
        t.join(120)
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        # uvicorn re-raises the captured SIGTERM after its graceful shutdown: a clean exit by that signal
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
