"""A real server on localhost (uvicorn in a thread) over a tiny model, and an official OpenAI client."""
from __future__ import annotations

import socket
import threading
import time

import pytest

API_KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    def __init__(self, app, port: int) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def served(tiny_llm):
    """(LLM, server url) for a tiny llama with an API key; small limits so tests can hit them."""
    from fastinfer.entrypoints.openai_server import ServerConfig, build_app

    llm = tiny_llm("llama", max_num_seqs=8)
    cfg = ServerConfig(served_model_name="tiny", api_key=API_KEY, max_body_bytes=64 * 1024, max_n=4,
                       max_pending=8)
    with ServerThread(build_app(llm.engine, cfg), free_port()) as srv:
        yield llm, srv.url


@pytest.fixture()
def client(served):
    import openai

    return openai.OpenAI(base_url=served[1] + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_path):
    """The embedded SmolLM2-135M-Instruct GGUF in float32, loaded once for the server tests that use it."""
    from fastinfer import LLM

    return LLM("smollm2-135m", dtype="float32", max_model_len=1024, max_num_seqs=8, load_progress=False)


@pytest.fixture(scope="module")
def smollm2_server(smollm2_llm):
    """Factory: ServerConfig fields -> url of a server on the shared SmolLM2 engine (API key ``API_KEY``). One
    server runs the engine at a time: asking for other settings stops the previous one; the last stops with the
    module."""
    from fastinfer.entrypoints.openai_server import ServerConfig, build_app

    current: dict = {}

    def stop() -> None:
        if "server" in current:
            current.pop("server").__exit__(None, None, None)

    def make(**kw) -> str:
        if "server" not in current or current["settings"] != kw:
            stop()
            cfg = ServerConfig(served_model_name="smollm2", api_key=API_KEY, **kw)
            current["server"] = ServerThread(build_app(smollm2_llm.engine, cfg), free_port()).__enter__()
            current["settings"] = kw
        return current["server"].url

    yield make
    stop()


def openai_client(url: str):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
