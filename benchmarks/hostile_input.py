"""Does a hostile request hold up the others? ``mmprefix serve`` (embedded BLIP, VQA) answers the same small
requests from N concurrent clients alone, and again while other clients keep sending a 4 MB single-word question
(one token for the tokenizer: it passes ``--max-input-tokens``; the server must refuse it by its length, before it
is tokenised, and never tokenise texts on its event loop). Rounds alternate (A B, B A, ...) so that background load
hits both alike; the report gives the small requests' wall time in each mode and their ratio.

    nice python benchmarks/hostile_input.py                       # ~1 minute on 2 quiet cores
    nice python benchmarks/hostile_input.py --requests 400 --rounds 4
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import signal
import sys
import tempfile
from pathlib import Path

from serve_load import load_requests, run_clients, start_server

GOAL = 1.5  # small requests' wall time with hostile ones / alone, at most


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="small requests per mode, split over the rounds")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--hostile-clients", type=int, default=2)
    parser.add_argument("--word-bytes", type=int, default=4 * 2**20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--window-ms", type=float, default=5.0)
    args = parser.parse_args(argv)

    requests = load_requests(args.requests)
    uri = {r["image"]: "data:image/png;base64," + base64.b64encode(r["image"].read_bytes()).decode() for r in requests}
    small = [json.dumps({"image": uri[r["image"]], "question": r["question"]}).encode() for r in requests]
    first = requests[0]
    huge = json.dumps({"image": uri[first["image"]], "question": "a" * args.word_bytes}).encode()
    process, base = start_server(Path(tempfile.mkdtemp(prefix="mmprefix-hostile-")), "--max-batch-size",
                                 str(args.max_batch_size), "--window-ms", str(args.window_ms))
    seconds = {"alone": 0.0, "with hostile requests": 0.0}
    statuses: dict[str, int] = {}
    try:
        asyncio.run(run_clients(base, small[: 2 * args.clients], args.clients))  # warm up
        for number in range(args.rounds):
            chunk = small[number :: args.rounds]
            for mode in list(seconds) if number % 2 == 0 else list(seconds)[::-1]:
                hostile = [huge] * (4 * args.hostile_clients) if mode != "alone" else []
                took, answered = asyncio.run(_round(base, chunk, hostile, args))
                seconds[mode] += took
                for answer in answered:
                    statuses[str(answer)] = statuses.get(str(answer), 0) + 1
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    print(f"\n{args.requests} small VQA requests per mode from {args.clients} clients; hostile: {args.hostile_clients} "
          f"clients sending {args.word_bytes} B single-word questions; {args.rounds} alternating rounds\n")
    print("| mode | wall seconds of the small requests |\n|---|---|")
    for mode, value in seconds.items():
        print(f"| {mode} | {value:.2f} |")
    ratio = seconds["with hostile requests"] / seconds["alone"]
    print(f"\nwith / alone: {ratio:.2f}x (goal <= {GOAL}x: {'met' if ratio <= GOAL else 'NOT met'})")
    print(f"hostile requests answered: {statuses}")
    return 0


async def _round(base: str, small: list[bytes], hostile: list[bytes], args) -> tuple[float, list]:
    """The small requests' wall seconds, while ``hostile`` requests are sent from their own clients."""
    attack = asyncio.ensure_future(run_clients(base, hostile, args.hostile_clients)) if hostile else None
    await asyncio.sleep(0.05 if hostile else 0)  # the hostile requests arrive first
    _, _, took = await run_clients(base, small, args.clients)
    answered = (await attack)[0] if attack is not None else []
    return took, answered


if __name__ == "__main__":
    sys.exit(main())
