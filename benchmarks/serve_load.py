"""Load on the server: 1, 8 and 32 concurrent clients, on loopback, for a bounded time each.

Starts ``flexmoe serve``'s app in this process on 127.0.0.1 (a free port) over a copy of a
merged model (default: the demo's, ``demo-output/merged``; run ``make demo`` first) and drives
``/v1/completions`` from client threads, each request with its own expert selection (cycling
through: every expert, each owner's expert excluded in turn). Every request asks for the same
number of new tokens with ``stop`` unset, so rows that hit end-of-text early are the only
difference. Reports requests/s, generated tokens/s and p50/p99 latency per setting, and each
setting's throughput over one client's (target at 8 clients: >= 2). Runs on CUDA when present
(``--device``); generation threads as ``flexmoe serve`` sets them (``--threads``). Prints JSON.

Usage: ``python benchmarks/serve_load.py [MODEL] [--clients 1,8,32] [--seconds 20]
[--max-tokens 32] [--threads N]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import torch
import uvicorn

from flexmoe import __version__
from flexmoe.merge.layout import read_slots
from flexmoe.serve.app import create_app

PROMPTS = [
    "Permission is hereby granted, free of charge,",
    "def main(argv):",
    "A: how was your weekend?\nB:",
    "Enter KING HENRY.",
    "Mr. Speaker, the state of the union",
]


def _drive(url: str, clients: int, seconds: float, max_tokens: int, choices: list[dict]) -> dict:
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(index: int) -> None:
        with httpx.Client(timeout=120) as http:
            n = 0
            while time.monotonic() < stop_at:
                body = {
                    "prompt": PROMPTS[(index + n) % len(PROMPTS)], "max_tokens": max_tokens,
                    "temperature": 1.0, "seed": index * 1000 + n,
                    "experts": choices[(index + n) % len(choices)],
                }  # fmt: skip
                start = time.perf_counter()
                answer = http.post(f"{url}/v1/completions", json=body)
                answer.raise_for_status()
                took = time.perf_counter() - start
                with lock:
                    latencies.append(took)
                    tokens[0] += answer.json()["usage"]["completion_tokens"]
                n += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "clients": clients,
        "requests": len(latencies),
        "seconds": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 3),
        "tokens_per_s": round(tokens[0] / wall, 1),
        "latency_p50_s": round(statistics.median(ordered), 3),
        "latency_p99_s": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="demo-output/merged", type=Path)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--clients", default="1,8,32", help="comma-separated client counts")
    parser.add_argument("--threads", type=int, default=None, help="as flexmoe serve --threads")
    args = parser.parse_args()
    from flexmoe.device import pick_device, serving_threads

    device = pick_device(args.device)
    torch.set_num_threads(args.threads or serving_threads())  # flexmoe serve's default
    counts = [int(c) for c in args.clients.split(",")]
    if not (args.model / "flexmoe_slots.json").is_file():
        sys.exit(f"{args.model}: not a merged model; run `make demo` first or pass MODEL")
    names = [s.name for s in read_slots(args.model)[1:]]
    choices = [{}, *({"exclude": [n]} for n in names)]
    scratch = tempfile.TemporaryDirectory()  # a copy, so the model's own ledger stays clean
    model = Path(shutil.copytree(args.model, Path(scratch.name) / args.model.name))
    app = create_app(model, device=device, max_batch=args.max_batch)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    try:
        _drive(url, 1, 2.0, args.max_tokens, choices)  # warm-up
        runs = [_drive(url, n, args.seconds, args.max_tokens, choices) for n in counts]
        health = httpx.get(f"{url}/health").json()
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        scratch.cleanup()
    result = {
        "benchmark": "serve_load",
        "flexmoe_version": __version__,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": str(args.model),
        "device": str(device),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "max_tokens": args.max_tokens,
        "max_batch": args.max_batch,
        "runs": runs,
        "largest_batch": health["largest_batch"],
        "throughput_over_first": {
            str(r["clients"]): round(r["tokens_per_s"] / runs[0]["tokens_per_s"], 2) for r in runs
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
