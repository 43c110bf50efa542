"""Load test of ``mmprefix serve`` on loopback: many prefixes at once against one prefix, and against serving
one request at a time with a switch of the active prefix per request (what PEFT users do with set_adapter).

The embedded BLIP (VQA head) with 8 random prefixes of 12 virtual tokens (``init_std=1``; the report says how many
answers they change), questions and images from the synthetic world's VQA test split. Three modes, the same requests:

* mixed: N concurrent clients (default 16), request i routed to prefix i mod 8, over HTTP to the server;
* one prefix: the same load, every request routed to the first prefix;
* serial switching: in this process, one request at a time, ``set_prefix`` before each (no HTTP cost, which
  favours it).

Modes run in alternating rounds (A B C, C B A, ...) so that background load hits them alike; throughput is
requests per second of wall time, latencies are each request's time as its client saw it. Every answer is
compared with the same request run alone on a model switched to its prefix (greedy decoding: identical text),
and the batch-size histogram comes from the server's /metrics. The server runs in a child process on
127.0.0.1 (a free port), receives only this script's requests, and is stopped with SIGTERM at the end.

    nice python benchmarks/serve_load.py                  # ~5 minutes on 2 quiet cores
    nice python benchmarks/serve_load.py --clients 16 --requests 192 --rounds 4
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from mmprefix import PrefixConfig, PrefixModel, add_prefix
from mmprefix.data import load_image, synthetic
from mmprefix.embedded import load_backbone
from mmprefix.evaluation import decode

GOALS = {"one prefix": 0.9, "serial switching": 2.0}  # mixed throughput / mode throughput, at least
BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # the server's batch-size histogram bounds


def make_prefixes(folder: Path, count: int, tokens: int) -> list[str]:
    model, _ = load_backbone("blip", "vqa")
    names = [f"p{i}" for i in range(count)]
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        pm = add_prefix(model, PrefixConfig(num_virtual_tokens=tokens, init_std=1.0))
        pm.save_prefix(folder / name)
        pm.remove_prefix()
    return names


def load_requests(count: int) -> list[dict]:
    """VQA test questions with their image files' bytes, as many as asked (cycling if needed)."""
    world = synthetic.build_world()
    rows = [json.loads(line) for line in (world / "vqa_downstream_test.jsonl").read_text().splitlines()]
    return [{"image": world / rows[i % len(rows)]["image"], "question": rows[i % len(rows)]["question"]}
            for i in range(count)]


def start_server(folder: Path, args) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "mmprefix.cli", "serve", "--model", "embedded:blip:vqa", "--prefixes", str(folder),
               "--port", "0", "--max-batch-size", str(args.max_batch_size), "--window-ms", str(args.window_ms)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
        if found:
            threading.Thread(target=process.stderr.read, daemon=True).start()  # keep the pipe drained
            return process, found.group(1)
        if not line and process.poll() is not None:
            break
    process.kill()
    raise SystemExit("the server did not start")


def batch_histogram(base: str) -> dict[float, float]:
    """Cumulative batch-size bucket counts of the server so far."""
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return {float(s.labels["le"]): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "mmprefix_batch_size_bucket"}


async def run_clients(base: str, bodies: list[bytes], clients: int, deadline: float) -> tuple[list, list, float]:
    """Send ``bodies`` from ``clients`` concurrent clients (each sends its next request when it has an answer);
    returns (answers, latencies in seconds, wall seconds). Requests left at the deadline are not sent."""
    answers, latencies, queue = [None] * len(bodies), [None] * len(bodies), list(range(len(bodies)))[::-1]
    headers = {"content-type": "application/json"}

    async def client(http: httpx.AsyncClient) -> None:
        while queue and time.monotonic() < deadline:
            index = queue.pop()
            started = time.perf_counter()
            response = await http.post("/v1/vqa", content=bodies[index], headers=headers)
            latencies[index] = time.perf_counter() - started
            answers[index] = response.json().get("answer") if response.status_code == 200 else f"HTTP {response.status_code}"

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=300) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return answers, latencies, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--prefixes", type=int, default=8)
    parser.add_argument("--prefix-tokens", type=int, default=12)
    parser.add_argument("--requests", type=int, default=192, help="per mode, split over the rounds")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--window-ms", type=float, default=5.0)
    parser.add_argument("--max-seconds", type=float, default=1200, help="stop sending requests after this long")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    deadline = time.monotonic() + args.max_seconds
    load_before = os.getloadavg()

    folder = Path(tempfile.mkdtemp(prefix="mmprefix-serve-load-"))
    names = make_prefixes(folder, args.prefixes, args.prefix_tokens)
    requests = load_requests(args.requests)
    images = {r["image"]: load_image(r["image"]) for r in requests}

    def body(request: dict, prefix: str) -> bytes:
        uri = "data:image/png;base64," + base64.b64encode(request["image"].read_bytes()).decode()
        return json.dumps({"image": uri, "question": request["question"], "prefix": prefix}).encode()

    routes = {"mixed": [names[i % len(names)] for i in range(len(requests))], "one prefix": [names[0]] * len(requests)}
    bodies = {mode: [body(r, p) for r, p in zip(requests, route)] for mode, route in routes.items()}

    # The same requests alone, one at a time, switching the active prefix before each.
    model, processor = load_backbone("blip", "vqa")
    model = PrefixModel(model)
    for name in names:
        model.load_prefix(name, folder / name)

    def alone(indices: list[int], route: list[str]) -> list[str]:
        out = []
        for i in indices:
            model.set_prefix(route[i])
            out += decode.answer_questions(model, processor, [images[requests[i]["image"]]], [requests[i]["question"]])
        return out

    process, base = start_server(folder, args)
    results = {mode: {"answers": [None] * len(requests), "latencies": [None] * len(requests), "seconds": 0.0,
                      "histogram": {}} for mode in ("mixed", "one prefix", "serial switching")}
    try:
        asyncio.run(run_clients(base, bodies["mixed"][: 2 * args.clients], args.clients, deadline))  # warm up
        chunks = [list(range(len(requests)))[k :: args.rounds] for k in range(args.rounds)]
        for number, chunk in enumerate(chunks):
            order = ["mixed", "one prefix", "serial switching"]
            for mode in order if number % 2 == 0 else order[::-1]:
                result = results[mode]
                if mode == "serial switching":
                    started = time.perf_counter()
                    for i in chunk:
                        if time.monotonic() > deadline:
                            break
                        single = time.perf_counter()
                        result["answers"][i] = alone([i], routes["mixed"])[0]
                        result["latencies"][i] = time.perf_counter() - single
                    result["seconds"] += time.perf_counter() - started
                    continue
                before = batch_histogram(base)
                answers, latencies, seconds = asyncio.run(
                    run_clients(base, [bodies[mode][i] for i in chunk], args.clients, deadline))
                after = batch_histogram(base)
                for i, answer, latency in zip(chunk, answers, latencies):
                    result["answers"][i], result["latencies"][i] = answer, latency
                result["seconds"] += seconds
                for bound, count in after.items():
                    result["histogram"][bound] = result["histogram"].get(bound, 0) + count - before.get(bound, 0)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    load_after = os.getloadavg()

    references = {"mixed": results["serial switching"]["answers"], "serial switching": results["serial switching"]["answers"]}
    references["one prefix"] = alone(range(len(requests)), routes["one prefix"])  # untimed
    report(args, results, references, _base_answers(model, processor, requests, images), load_before, load_after)
    return 0


def _base_answers(model, processor, requests, images) -> list[str]:
    """The frozen model's own answers, to show how much the prefixes change."""
    with model.using(None):
        return [decode.answer_questions(model, processor, [images[r["image"]]], [r["question"]])[0] for r in requests]


def report(args, results, references, base_answers, load_before, load_after) -> None:
    print(f"\nmmprefix serve load test: embedded BLIP (VQA), {args.prefixes} prefixes of {args.prefix_tokens} tokens, "
          f"{args.clients} clients, {args.requests} requests per mode in {args.rounds} alternating rounds, "
          f"max batch {args.max_batch_size}, window {args.window_ms:g} ms")
    print(f"torch threads {torch.get_num_threads()}, load average {load_before[0]:.2f} at start, "
          f"{load_after[0]:.2f} at end (1 min)\n")
    print("| mode | requests | throughput (req/s) | p50 latency (ms) | p99 latency (ms) | wrong answers |")
    print("|---|---|---|---|---|---|")
    throughput = {}
    for mode, result in results.items():
        done = [i for i, a in enumerate(result["answers"]) if a is not None]
        wrong = sum(result["answers"][i] != references[mode][i] for i in done)
        latencies = [result["latencies"][i] * 1000 for i in done]
        throughput[mode] = len(done) / result["seconds"] if result["seconds"] else 0.0
        checked = "reference" if mode == "serial switching" else wrong  # the requests alone, as the others are checked
        print(f"| {mode} | {len(done)} | {throughput[mode]:.1f} | {percentile(latencies, 50):.0f} | "
              f"{percentile(latencies, 99):.0f} | {checked} |")
    print()
    for mode, goal in GOALS.items():
        ratio = throughput["mixed"] / throughput[mode] if throughput[mode] else float("nan")
        print(f"mixed / {mode} throughput: {ratio:.2f}x (goal >= {goal}x: {'met' if ratio >= goal else 'NOT met'})")
    changed = sum(a != b for a, b in zip(references["mixed"], base_answers) if a is not None)
    print(f"answers that differ from the frozen model's own: {changed} of {len(base_answers)} (mixed routes)\n")
    print("batch sizes (batches per size range):")
    for mode in ("mixed", "one prefix"):
        histogram = results[mode]["histogram"]
        counts, previous, lower = [], 0.0, 1
        for bound in BUCKETS:
            count = histogram.get(float(bound), 0.0) - previous
            previous = histogram.get(float(bound), 0.0)
            if count:
                counts.append(f"{lower if lower == bound else f'{lower}-{bound}'}: {int(count)}")
            lower = bound + 1
        total = histogram.get(float(BUCKETS[-1]), 0.0)
        print(f"  {mode}: {', '.join(counts)} ({int(total)} batches, mean {args.requests / total if total else 0:.1f})")


if __name__ == "__main__":
    sys.exit(main())
