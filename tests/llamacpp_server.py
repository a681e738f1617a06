"""A real llama.cpp server for the tests: llama-cpp-python's OpenAI-compatible server
(``python -m llama_cpp.server``, its ``server`` extra) on a GGUF file, on a free port of
127.0.0.1, ready once it lists its model, killed at the end.

Its settings are fixed so that an in-process ``llama_cpp.Llama`` built with
``server.llama_settings()`` computes what the server computes (the same context, batch and
threads).

Example::

    with LlamaCppServer.start(zoo.gguf_file("smollm2-135m-instruct"), "smollm2-135m-instruct") as server:
        engine = RemoteEngine(server.url, server.alias)     # server.url: http://127.0.0.1:PORT/v1
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

READY_TIMEOUT_S = 120  # loading a small GGUF takes seconds; a cold page cache on a busy machine, longer
THREADS = 2  # decode and prompt alike: what ragdec's tests give a model on their 2-core machines
# llama-cpp-python's server applies its own sampling defaults to whatever a request leaves
# out; at temperature 0 the one that still acts is this penalty on the last 64 tokens
# (llama_cpp/server/types.py, repeat_penalty_field), so the server's "greedy" is greedy
# over penalized logits unless a request sends repeat_penalty 1.0
SERVER_REPEAT_PENALTY = 1.1


class MissingServer(RuntimeError):
    """llama-cpp-python, or its server extra, is not installed."""


def check_installed() -> None:
    """Raises MissingServer with what to install."""
    try:
        import llama_cpp.server.app  # noqa: F401 - the extra's fastapi, sse-starlette, pydantic-settings come with it
    except ImportError as error:
        raise MissingServer(f"llama-cpp-python's server is not installed ({error}): run `make llamacpp`") from None


class LlamaCppServer:
    """One running server of one model, answering as ``alias``; ``url`` is its API root."""

    def __init__(self, process: subprocess.Popen, port: int, alias: str, gguf: Path, n_ctx: int, log: Path):
        self.process = process
        self.port = port
        self.alias = alias  # the model name its API answers with (GET /v1/models)
        self.gguf = gguf
        self.n_ctx = n_ctx  # the server's whole context, prompt and answer together
        self.log = log  # its stdout and stderr, for a failure's message
        self.url = f"http://127.0.0.1:{port}/v1"

    @classmethod
    def start(cls, gguf: Path, alias: str, n_ctx: int = 2048, interrupt_requests: bool = False) -> "LlamaCppServer":
        """``interrupt_requests``: the server's own default (True) ends a streamed answer when
        another request comes; off here unless a test asks, so that each test's answers
        are cut only by that test."""
        from ragdec.bench.server_load import free_port

        check_installed()
        port = free_port()
        log = Path(tempfile.mkstemp(prefix="ragdec-llamacpp-", suffix=".log")[1])
        settings = {"model": str(gguf), "model_alias": alias, "host": "127.0.0.1", "port": port, "n_ctx": n_ctx,
                    "n_batch": 512, "n_threads": THREADS, "n_threads_batch": THREADS, "verbose": False,
                    # the last position's logits only, as llama_cpp.Llama computes by default: the
                    # server's default (all positions) runs the output layer over other batches
                    "logits_all": False,
                    "interrupt_requests": interrupt_requests}
        command = [sys.executable, "-m", "llama_cpp.server", *(f"--{key}={value}" for key, value in settings.items())]
        with log.open("wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        server = cls(process, port, alias, gguf, n_ctx, log)
        try:
            server._wait_ready()
        except BaseException:
            server.stop()
            raise
        return server

    def llama_settings(self) -> dict:
        """``llama_cpp.Llama``'s arguments for computing what this server computes."""
        return {"model_path": str(self.gguf), "n_ctx": self.n_ctx, "n_batch": 512, "n_threads": THREADS,
                "n_threads_batch": THREADS, "verbose": False}

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", "/v1/models")
                response = connection.getresponse()
                if response.status == 200 and self.alias in {m["id"] for m in json.loads(response.read())["data"]}:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"llama_cpp.server did not list {self.alias} within {READY_TIMEOUT_S} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"

    def kill(self) -> None:
        """Stop it at once, as a crash would (SIGKILL): connections drop mid-answer."""
        self.process.kill()
        self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:  # no server may outlive the session
                self.kill()
        self.log.unlink(missing_ok=True)

    def __enter__(self) -> "LlamaCppServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
