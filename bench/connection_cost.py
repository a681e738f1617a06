"""What one open connection costs `ragdec serve` in memory: the measure behind
``ragdec.app.transport.MEASURED_CONNECTION_BYTES`` (and so behind the connection bound).

    ragdec bench connection-cost --json bench/results/connection_cost.json

What runs: a server in a subprocess on a free 127.0.0.1 port, with ragdec's protocol
(``server_config``: the header deadline, the lingering close) and a FastAPI app of two
routes, /health and a POST that reads its body; then, for each state, CONNECTIONS
connections are opened to it and held:

1. idle: each asked /health once and kept alive;
2. in flight: each sent a POST's head and 1 KB of its body, the rest still to come (the
   request's task, its h11 state and the body read so far are all held).

The cost of a state is the server's resident memory (VmRSS) and the kernel's (TCP buffers
and unreclaimable slab, both ends of each connection and the machine's other work, so an
upper bound) after the connections are open, less before, over CONNECTIONS; a fresh
server for each state. Linux only; bounded: a fixed number of connections, loopback only.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

CONNECTIONS = 1000
BODY_SENT = 1024  # of a POST's body, before the connection is held
SERVER = """
import socket, sys, uvicorn
from fastapi import FastAPI, Request
from ragdec.app.transport import server_config
app = FastAPI()
@app.get("/health")
def health():
    return {"ok": True}
@app.post("/upload")
async def upload(request: Request):
    return {"bytes": len(await request.body())}
sock = socket.socket(); sock.bind(("127.0.0.1", 0)); print(sock.getsockname()[1], flush=True)
config = server_config(app, header_timeout=600, max_connections=0, log_level="warning", timeout_keep_alive=600)
uvicorn.Server(config).run(sockets=[sock])
"""


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def kernel_bytes() -> int:
    """The kernel's TCP buffers (/proc/net/sockstat) and its unreclaimable slab (/proc/meminfo:
    the sockets themselves), machine-wide."""
    with open("/proc/net/sockstat") as sockstat:
        fields = next(line.split() for line in sockstat if line.startswith("TCP:"))
    with open("/proc/meminfo") as meminfo:
        slab = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("SUnreclaim:"))
    return int(fields[fields.index("mem") + 1]) * os.sysconf("SC_PAGE_SIZE") + slab


def settle(pid: int) -> tuple[int, int]:
    time.sleep(1.0)
    return resident_bytes(pid), kernel_bytes()


def wait_for(port: int, seconds: float = 60) -> None:
    """Until the server listens on ``port`` (it prints the port before it starts)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            return
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def hold(port: int, state: str, count: int = CONNECTIONS) -> list[socket.socket]:
    """``count`` connections to the server, each left in ``state``."""
    held = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        if state == "idle":
            sock.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            answer = b""
            while not answer.endswith(b"}"):
                answer += sock.recv(4096)
        else:
            sock.sendall(f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {100 * BODY_SENT}\r\n\r\n".encode() + b" " * BODY_SENT)
        held.append(sock)
    return held


def measure() -> dict:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this process holds every client end
    rows = {}
    try:
        for state in ("idle", "in_flight"):  # a fresh server for each: memory freed by one state is not reused by the next
            server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
            try:
                port = int(server.stdout.readline())
                wait_for(port)
                hold(port, state, 1)[0].close()  # warm up: the first request's imports and caches are no connection's cost
                rss_before, kernel_before = settle(server.pid)
                held = hold(port, state)
                rss_after, kernel_after = settle(server.pid)
                rows[state] = {"process_bytes_per_connection": (rss_after - rss_before) // CONNECTIONS,
                               "kernel_bytes_per_connection_both_ends": max(kernel_after - kernel_before, 0) // CONNECTIONS}
                for sock in held:
                    sock.close()
            finally:
                server.terminate()
                server.wait(30)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return {"connections": CONNECTIONS, "body_bytes_sent_in_flight": BODY_SENT, "states": rows}


def run_connection_cost_bench(json_path: str | None = None) -> dict:
    """Measure both states; print the results and write them to ``json_path``."""
    from .harness import write_json
    from .machine import machine_info

    result = {"bench": "connection_cost", "machine": machine_info(), **measure()}
    print(json.dumps(result["states"], indent=2))
    if json_path:
        write_json(result, json_path)
    return result
