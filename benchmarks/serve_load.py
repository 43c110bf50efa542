"""Load and memory of ``mmprefix serve`` on loopback: step-level (continuous) against request-level batching, and
one server with many prefixes against one process per prefix.

**Load** (``load``): the embedded BLIP (VQA head) with P random prefixes of 12 virtual tokens (``init_std=3``:
they change about a third of the frozen model's answers; the report says how many),
questions of the synthetic world's VQA test split (their token lengths differ), request i routed to prefix
i mod P. For each number of clients and of prefixes, two servers run side by side, one per batching mode, and
get the same requests in alternating rounds (step then request, request then step, ...), so that background
load hits both alike; each client sends its next request when it has an answer. Per mode: throughput (requests
per second of wall time), p50/p99 latency as the clients saw it, the mean batch (rows per decoding step for
step-level batching, requests per batch for request-level, from the server's /metrics) and wrong answers: every
answer is compared with the same request run alone in this process, on the model switched to its prefix
(greedy decoding: the same text).

``--task caption`` sends captions instead (longer answers), ``--task text`` the embedded LM's continuations of
the text records' prompts (two formats of different lengths, alternately) through the chat API, up to
``--new-tokens`` each (most end after a few tokens; the report says how many decoding steps they took).

**In process** (``engine``): the same requests, rounds, figures and checks with no HTTP in between: a model per
mode in this process, a fresh `PrefixService` on it for each round, each client a thread that submits a `Job`
(its image already decoded) and waits for its answer. What batching alone gives, apart from what the HTTP server costs
both modes alike (on a 2-core machine the server, its clients and the model share the cores).

**Memory** (``memory``): one server holding N prefixes, against N servers each holding the base model and one
prefix (N = 1, 8, 32), each having answered one request per prefix; resident memory is the PSS of each process
(its private pages plus its share of the pages it shares with the others, from /proc/PID/smaps_rollup; their
sum is what the processes take together), with the plain RSS beside it.

    nice python benchmarks/serve_load.py                                     # both parts, the issue's settings
    nice python benchmarks/serve_load.py load --clients 16 --prefixes 8      # the goal's setting only
    nice python benchmarks/serve_load.py load --task caption                 # captions: longer answers
    nice python benchmarks/serve_load.py engine --clients 16 --prefixes 8    # the same without HTTP
    python benchmarks/serve_load.py load --clients 4 --prefixes 2 --requests 16 --rounds 2   # a quick check
    python benchmarks/serve_load.py memory --counts 1 8 32
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
from collections.abc import Callable
from pathlib import Path

import httpx
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mmprefix import PrefixConfig, PrefixModel, add_prefix
from mmprefix.data import load_image, synthetic
from mmprefix.embedded import load_backbone
from mmprefix.evaluation import decode
from mmprefix.serving import Engine, Job, PrefixService

MODES = ("step", "request")
# --task: the served model, its endpoint and the backbone (name, head) the references load
TASKS = {"vqa": ("embedded:blip:vqa", "/v1/vqa", ("blip", "vqa")),
         "caption": ("embedded:blip:caption", "/v1/captions", ("blip", "caption")),
         "text": ("embedded:lm", "/v1/chat/completions", ("lm", None))}
# step-level / request-level, at 16 clients and 8 prefixes (the goals)
GOALS = {"throughput": 2.0, "p99 latency": 0.6, "mean batch": 10}
MEMORY_GOALS = {"server": 1.1}  # 32 prefixes on one server, against one prefix


def make_prefixes(folder: Path, count: int, tokens: int, std: float = 3.0, task: str = "vqa") -> list[str]:
    model, _ = load_backbone(*TASKS[task][2])
    names = [f"p{i}" for i in range(count)]
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        pm = add_prefix(model, PrefixConfig(num_virtual_tokens=tokens, init_std=std))
        pm.save_prefix(folder / name)
        pm.remove_prefix()
    return names


def load_requests(count: int, task: str = "vqa") -> list[dict]:
    """VQA test questions with their image files (``text``: the two record formats' test prompts, alternately:
    prompts of two lengths), as many as asked (cycling if needed)."""
    world = synthetic.build_world()
    if task == "text":
        formats = [[json.loads(line)["prompt"] for line in (world / f"text_{f}_test.jsonl").read_text().splitlines()]
                   for f in "ab"]
        return [{"prompt": formats[i % 2][(i // 2) % len(formats[i % 2])]} for i in range(count)]
    rows = [json.loads(line) for line in (world / "vqa_downstream_test.jsonl").read_text().splitlines()]
    return [{"image": world / rows[i % len(rows)]["image"], "question": rows[i % len(rows)]["question"]}
            for i in range(count)]


def start_server(folder: Path, *options: str, task: str = "vqa") -> tuple[subprocess.Popen, str]:
    """``mmprefix serve`` of an embedded BLIP head on a free loopback port; (process, base URL)."""
    command = [sys.executable, "-m", "mmprefix.cli", "serve", "--model", TASKS[task][0], "--prefixes", str(folder),
               "--port", "0", *options]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 300
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


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()


def batch_totals(base: str) -> tuple[float, float]:
    """(rows or requests, steps or batches) the server has counted so far."""
    return metric_totals(httpx.get(f"{base}/metrics", timeout=60).text)


def metric_totals(text: str) -> tuple[float, float]:
    """(rows or requests, steps or batches) in a service's metrics, as Prometheus text."""
    values = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
              if s.name in ("mmprefix_batch_size_sum", "mmprefix_batch_size_count")}
    return values.get("mmprefix_batch_size_sum", 0.0), values.get("mmprefix_batch_size_count", 0.0)


def request_body(task: str, request: dict, prefix: str, new_tokens: int) -> dict:
    if task == "text":  # the embedded LM has no chat template: the chat API continues the message's text
        return {"model": prefix, "messages": [{"role": "user", "content": request["prompt"]}], "max_tokens": new_tokens}
    uri = "data:image/png;base64," + base64.b64encode(request["image"].read_bytes()).decode()
    question = {"question": request["question"]} if task == "vqa" else {}
    return {"image": uri, **question, "prefix": prefix}


def request_job(task: str, request: dict, prefix: str, images: dict, new_tokens: int) -> Job:
    """The `Job` the server makes of `request_body`."""
    if task == "text":
        return Job("text", prefix, None, request["prompt"], generation=(("max_new_tokens", new_tokens),))
    return Job(task, prefix, images[request["image"]], request["question"] if task == "vqa" else None)


def response_answer(task: str, body: dict) -> str:
    return body["choices"][0]["message"]["content"] if task == "text" else body["answer" if task == "vqa" else "caption"]


async def run_clients(base: str, bodies: list[bytes], clients: int, task: str = "vqa") -> tuple[list, list, float]:
    """Send ``bodies`` from ``clients`` concurrent clients; (answers, latencies in seconds, wall seconds)."""
    endpoint = TASKS[task][1]
    answers, latencies, queue = [None] * len(bodies), [None] * len(bodies), list(range(len(bodies)))[::-1]
    headers = {"content-type": "application/json"}

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            index = queue.pop()
            started = time.perf_counter()
            response = await http.post(endpoint, content=bodies[index], headers=headers)
            latencies[index] = time.perf_counter() - started
            answers[index] = response_answer(task, response.json()) if response.status_code == 200 \
                else f"HTTP {response.status_code}"

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=600) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return answers, latencies, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def alone_answers(folder: Path, names: list[str], requests: list[dict], route: list[str | None],
                  task: str = "vqa", new_tokens: int = 32) -> list[str]:
    """Each request alone, on the model switched to its prefix (None: the frozen model): the reference every
    served answer must equal."""
    model, processor = load_backbone(*TASKS[task][2])
    model = PrefixModel(model)
    for name in names:
        model.load_prefix(name, folder / name)
    images = {r["image"]: load_image(r["image"]) for r in requests if "image" in r}
    out = []
    for request, name in zip(requests, route):
        model.set_prefix(name)
        if task == "text":
            out += decode.complete_texts(model, processor, [request["prompt"]], max_new_tokens=new_tokens)
        elif task == "vqa":
            out += decode.answer_questions(model, processor, [images[request["image"]]], [request["question"]])
        else:
            out += decode.caption_images(model, processor, [images[request["image"]]])
    return out


def measure_load(clients: int, prefixes: int, args: argparse.Namespace) -> dict:
    """Both modes on the same requests, in alternating rounds: per mode its figures, and the references."""
    folder = Path(tempfile.mkdtemp(prefix="mmprefix-serve-load-"))
    names = make_prefixes(folder, prefixes, args.prefix_tokens, args.prefix_std, args.task)
    requests = load_requests(args.requests, args.task)
    route = [names[i % len(names)] for i in range(len(requests))]

    results = {mode: {"answers": [None] * len(requests), "latencies": [None] * len(requests), "seconds": 0.0,
                      "rows": 0.0, "batches": 0.0} for mode in MODES}
    if args.part == "engine":
        targets, close = engine_targets(folder, requests, route, clients, args)
    else:
        bodies = [json.dumps(request_body(args.task, r, p, args.new_tokens)).encode() for r, p in zip(requests, route)]
        targets, close = http_targets(folder, bodies, clients, args)
    try:
        for send, _ in targets.values():  # warm up: imports, first calls
            send(list(range(min(2 * clients, len(requests)))))
        for number in range(args.rounds):
            chunk = list(range(len(requests)))[number :: args.rounds]
            for mode in MODES if number % 2 == 0 else MODES[::-1]:
                _round(targets[mode], results[mode], chunk)
    finally:
        close()
    expected = alone_answers(folder, names, requests, route, args.task, args.new_tokens)  # untimed
    for result in results.values():
        result["wrong"] = sum(a != e for a, e in zip(result["answers"], expected))
    frozen = alone_answers(folder, [], requests, [None] * len(requests), args.task, args.new_tokens)
    return {"modes": results, "changed": sum(a != b for a, b in zip(expected, frozen)), "requests": len(requests)}


def http_targets(folder: Path, bodies: list[bytes], clients: int, args: argparse.Namespace) -> tuple[dict, Callable]:
    """Per mode a server and ``(send, totals)``: ``send(indices)`` gives (answers, latencies, seconds) of those
    requests from ``clients`` concurrent clients; ``totals()`` the server's batch counts. And how to stop them."""
    batch = str(args.max_batch_size or clients)
    servers = {mode: start_server(folder, "--batching", mode, "--max-batch-size", batch, "--window-ms", str(args.window_ms),
                                  task=args.task) for mode in MODES}

    def target(base: str) -> tuple[Callable, Callable]:
        def send(indices: list[int]) -> tuple[list, list, float]:
            return asyncio.run(run_clients(base, [bodies[i] for i in indices], clients, args.task))
        return send, lambda: batch_totals(base)

    return {mode: target(base) for mode, (_, base) in servers.items()}, \
        lambda: stop([process for process, _ in servers.values()])


def engine_targets(folder: Path, requests: list[dict], route: list[str], clients: int,
                   args: argparse.Namespace) -> tuple[dict, Callable]:
    """As `http_targets`, with a model per mode in this process and one thread per client. Each round gets a
    fresh `PrefixService` (a worker thread), closed after it: an idle worker thread left beside the other mode's
    slowed both by a third here (each thread that runs PyTorch keeps its own OpenMP threads)."""
    images = {r["image"]: load_image(r["image"]) for r in requests if "image" in r}
    jobs = [lambda r=r, p=p: request_job(args.task, r, p, images, args.new_tokens) for r, p in zip(requests, route)]

    def target(mode: str) -> tuple[Callable, Callable]:
        model, processor = load_backbone(*TASKS[args.task][2])
        engine = Engine(PrefixModel(model), processor, TASKS[args.task][0])
        counted = [0.0, 0.0]  # rows or requests, steps or batches, over the rounds so far

        def send(indices: list[int]) -> tuple[list, list, float]:
            service = PrefixService([engine], folder, max_batch_size=args.max_batch_size or clients,
                                    window=args.window_ms / 1000, batching=mode)
            try:
                out = run_threads(service, [jobs[i] for i in indices], clients)
                rows, batches = metric_totals(generate_latest(service.metrics.registry).decode())
            finally:
                service.close()
            counted[0] += rows
            counted[1] += batches
            return out

        return send, lambda: tuple(counted)

    return {mode: target(mode) for mode in MODES}, lambda: None


def run_threads(service: PrefixService, jobs: list[Callable[[], Job]], clients: int) -> tuple[list, list, float]:
    """`run_clients` in process: each client a thread that submits its next job once it has an answer."""
    answers, latencies, queue, lock = [None] * len(jobs), [None] * len(jobs), list(range(len(jobs)))[::-1], threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                index = queue.pop()
            started = time.perf_counter()
            try:
                answers[index] = str(service.submit(jobs[index]()).result())
            except Exception as error:  # noqa: BLE001 - counted as a wrong answer, as an HTTP error is
                answers[index] = f"{type(error).__name__}: {error}"
            latencies[index] = time.perf_counter() - started

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers, latencies, time.perf_counter() - started


def _round(target: tuple[Callable, Callable], result: dict, chunk: list[int]) -> None:
    send, totals = target
    rows, batches = totals()
    answers, latencies, seconds = send(chunk)
    after = totals()
    for i, answer, latency in zip(chunk, answers, latencies):
        result["answers"][i], result["latencies"][i] = answer, latency
    result["seconds"] += seconds
    result["rows"] += after[0] - rows
    result["batches"] += after[1] - batches


def _summary(result: dict) -> dict[str, float]:
    latencies = [x * 1000 for x in result["latencies"]]
    return {"throughput": len(result["answers"]) / result["seconds"], "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99), "mean": result["rows"] / result["batches"] if result["batches"] else 0.0}


def report_load(figures: dict[tuple[int, int], dict], args: argparse.Namespace, load: tuple) -> bool:
    """Print the table and the ratios; True when the goals' setting (16 clients, 8 prefixes) met them."""
    where = "in process, no HTTP" if args.part == "engine" else "HTTP on loopback"
    print(f"\n## Load ({where}): {TASKS[args.task][0]}, prefixes of {args.prefix_tokens} tokens, {args.requests} requests per mode "
          f"in {args.rounds} alternating rounds, window {args.window_ms:g} ms")
    print(f"torch threads {torch.get_num_threads()} (this process), load average {load[0]:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at end (1 min)\n")
    print("| clients | prefixes | batching | requests | throughput (req/s) | p50 latency (ms) | p99 latency (ms) | "
          "mean batch | wrong answers |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (clients, prefixes), figure in figures.items():
        for mode, result in figure["modes"].items():
            s = _summary(result)
            unit = "rows per step" if mode == "step" else "requests per batch"
            print(f"| {clients} | {prefixes} | {mode} | {figure['requests']} | {s['throughput']:.1f} | {s['p50']:.0f} | "
                  f"{s['p99']:.0f} | {s['mean']:.1f} {unit} | {result['wrong']} |")
    print()
    met = True
    for (clients, prefixes), figure in figures.items():
        step, request = (_summary(figure["modes"][mode]) for mode in MODES)
        wrong = sum(r["wrong"] for r in figure["modes"].values())
        ratio, p99 = step["throughput"] / request["throughput"], step["p99"] / request["p99"]
        line = (f"{clients} clients, {prefixes} prefixes: step/request throughput {ratio:.2f}x, p99 latency {p99:.2f}x, "
                f"{step['mean']:.1f} rows per step of {args.max_batch_size or clients}, "
                f"{figure['modes']['step']['rows'] / figure['requests']:.1f} decoding steps per request after its prefill, "
                f"{wrong} wrong answers "
                f"(prefixes change {figure['changed']} of {figure['requests']} answers of the frozen model)")
        if (clients, prefixes) == (16, 8):
            met = ratio >= GOALS["throughput"] and p99 <= GOALS["p99 latency"] and step["mean"] > GOALS["mean batch"] \
                and wrong == 0
            line += (f"; goals >= {GOALS['throughput']}x, <= {GOALS['p99 latency']}x, > {GOALS['mean batch']} rows, "
                     f"0 wrong: {'met' if met else 'NOT met'}")
        print(line)
    return met


# -- memory ------------------------------------------------------------------------------------------------------
def resident(pid: int) -> tuple[float, float]:
    """(PSS, RSS) of a process in MiB, from /proc/PID/smaps_rollup."""
    fields = dict(re.findall(r"^(\w+):\s+(\d+) kB", Path(f"/proc/{pid}/smaps_rollup").read_text(), flags=re.M))
    return int(fields["Pss"]) / 1024, int(fields["Rss"]) / 1024


def _served(base: str, prefixes: list[str], image: Path, question: str) -> None:
    """One request per prefix (every prefix used once, as serving it would)."""
    uri = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    for name in prefixes:
        response = httpx.post(f"{base}/v1/vqa", json={"image": uri, "question": question, "prefix": name}, timeout=600)
        response.raise_for_status()


def measure_memory(counts: list[int], tokens: int, max_processes: int) -> dict[int, dict]:
    """Per N: (PSS, RSS) of one server holding N prefixes, and the sums over N servers holding one each (None
    above ``max_processes``: they would not fit this machine's memory)."""
    request = load_requests(1)[0]
    out = {}
    for count in counts:
        folder = Path(tempfile.mkdtemp(prefix="mmprefix-serve-memory-"))
        names = make_prefixes(folder / "all", count, tokens)
        for name in names:  # one folder per process, holding one prefix
            (folder / f"one-{name}").mkdir()
            os.symlink(folder / "all" / name, folder / f"one-{name}" / name)
        process, base = start_server(folder / "all")
        try:
            _served(base, names, request["image"], request["question"])
            server = resident(process.pid)
        finally:
            stop([process])
        out[count] = {"server": server, "processes": None}
        if count > max_processes:
            continue
        started = [start_server(folder / f"one-{name}") for name in names]
        try:
            for (_, base), name in zip(started, names):
                _served(base, [name], request["image"], request["question"])
            each = [resident(p.pid) for p, _ in started]
            out[count] = {"server": server, "processes": (sum(e[0] for e in each), sum(e[1] for e in each))}
        finally:
            stop([p for p, _ in started])
    return out


def report_memory(figures: dict[int, dict], tokens: int) -> bool:
    print(f"\n## Memory: embedded BLIP (VQA), prefixes of {tokens} tokens; PSS (RSS), MiB\n")
    print("| prefixes N | one server with N prefixes | N processes with one prefix each |")
    print("|---|---|---|")
    for count, figure in figures.items():
        spss, srss = figure["server"]
        processes = figure["processes"]
        apart = f"{processes[0]:.0f} ({processes[1]:.0f})" if processes else "not run (--max-processes)"
        print(f"| {count} | {spss:.0f} ({srss:.0f}) | {apart} |")
    first, last = min(figures), max(figures)
    one = figures[first]["server"][0]
    server = figures[last]["server"][0] / one
    met = server <= MEMORY_GOALS["server"]
    apart = figures[last]["processes"]
    print(f"\n{last} prefixes against {first} (PSS): one server {server:.3f}x (goal <= {MEMORY_GOALS['server']}x: "
          f"{'met' if met else 'NOT met'}), {last} processes " + (f"{apart[0] / one:.1f}x" if apart else "not run"))
    return met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", nargs="?", choices=("load", "engine", "memory", "all"), default="all")
    parser.add_argument("--task", choices=sorted(TASKS), default="vqa",
                        help="questions (short answers: prefill dominates), captions (longer answers) or the "
                             "embedded LM's continuations (up to --new-tokens)")
    parser.add_argument("--new-tokens", type=int, default=32, help="text: the most tokens of each continuation")
    parser.add_argument("--clients", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--prefixes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--prefix-tokens", type=int, default=12)
    parser.add_argument("--prefix-std", type=float, default=3.0, help="the random prefixes' init_std")
    parser.add_argument("--requests", type=int, default=192, help="per mode and setting, split over the rounds")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-batch-size", type=int, help="default: the number of clients")
    parser.add_argument("--window-ms", type=float, default=5.0)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 8, 32], help="memory: numbers of prefixes")
    parser.add_argument("--max-processes", type=int, default=32,
                        help="memory: run N servers side by side only up to this N (each takes ~0.5 GiB)")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    load, wrong = os.getloadavg(), 0
    if args.part in ("load", "engine", "all"):
        figures = {(c, p): measure_load(c, p, args) for c in args.clients for p in args.prefixes}
        report_load(figures, args, load)
        wrong = sum(r["wrong"] for f in figures.values() for r in f["modes"].values())
    if args.part in ("memory", "all"):
        report_memory(measure_memory(args.counts, args.prefix_tokens, args.max_processes), args.prefix_tokens)
    return 1 if wrong else 0  # timing goals depend on the machine; a wrong answer is a bug


if __name__ == "__main__":
    sys.exit(main())
