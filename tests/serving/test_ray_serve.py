"""The service on a local Ray instance (Ray Serve, two replicas, HTTP on 127.0.0.1), each replica batching step
by step: answers equal each prefix alone (over the task endpoint and a streamed chat with usage, through the
openai SDK), both replicas serve, and a prefix folder added while serving reaches every replica by rescanning."""

import concurrent.futures
import shutil
import socket
import threading
import time

import httpx
import pytest
import torch

import serve_tiny
from mmprefix import PrefixConfig, add_prefix
from mmprefix.embedded import load_backbone
from mmprefix.evaluation import decode

pytestmark = pytest.mark.slow  # needs pip install -e ".[ray]", as .ci/run does
QUESTION = "how many shapes are there?"


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _save(model, folder, seed):
    torch.manual_seed(seed)
    pm = add_prefix(model, PrefixConfig(num_virtual_tokens=4, init_std=0.5))
    pm.save_prefix(folder)
    pm.remove_prefix()


def _expected(folder, name, seed):
    model, processor = load_backbone("blip", "vqa")
    from mmprefix import PrefixModel

    model = PrefixModel(model)
    if name is not None:
        model.load_prefix(name, folder / name)
    return decode.answer_questions(model, processor, [serve_tiny.image(seed, 64)], [QUESTION])[0]


def test_two_replicas_on_local_ray_answer_as_each_prefix_alone_and_pick_up_new_folders(tmp_path):
    import ray
    from ray import serve

    from mmprefix.serving.ray_serve import application

    model, _ = load_backbone("blip", "vqa")
    for seed, name in enumerate(["one", "two"], 1):
        _save(model, tmp_path / "prefixes" / name, seed)
    _save(model, tmp_path / "later", 3)
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(prefixes=str(tmp_path / "prefixes"), num_replicas=2, window=0.05, rescan_seconds=0.5,
                              ray_actor_options={"num_cpus": 0.5}), route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        requests = [(name, seed) for seed in range(4) for name in ("one", "two", None)]
        answers = {}

        def ask(name, seed):
            body = {"image": serve_tiny.data_uri(serve_tiny.image(seed, 64)), "question": QUESTION, "prefix": name}
            answers[name, seed] = httpx.post(f"{base}/v1/vqa", json=body, timeout=120)

        threads = [threading.Thread(target=ask, args=request) for request in requests]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for (name, seed), response in answers.items():
            assert response.status_code == 200, response.text
            assert response.json()["answer"] == _expected(tmp_path / "prefixes", name, seed), (name, seed)
        pids = set()
        for _ in range(20):  # concurrent requests: Ray's router sends sequential ones to the least busy replica
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                pids |= {r.json()["pid"] for r in pool.map(lambda _: httpx.get(f"{base}/health", timeout=30), range(8))}
            if len(pids) == 2:
                break
        assert len(pids) == 2, "both replicas answer"
        assert httpx.get(f"{base}/health", timeout=30).json()["batching"] == {"embedded-blip-vqa": "step",
                                                                             "embedded-blip-caption": "step"}
        from openai import OpenAI

        client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        image = {"type": "image_url", "image_url": {"url": serve_tiny.data_uri(serve_tiny.image(1, 64))}}
        chunks = list(client.chat.completions.create(
            model="two", stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}, image]}]))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answers["two", 1].json()["answer"]
        assert chunks[-1].usage.completion_tokens >= 1 and chunks[-1].usage.prompt_tokens > 1

        shutil.copytree(tmp_path / "later", tmp_path / "prefixes" / "three")
        deadline, seen = time.monotonic() + 60, set()
        while time.monotonic() < deadline and len(seen) < 2:
            health = httpx.get(f"{base}/health", timeout=30).json()
            if "three" in health["models"]:
                seen.add(health["pid"])
            time.sleep(0.1)
        assert len(seen) == 2, "every replica rescans the folder"
        body = {"image": serve_tiny.data_uri(serve_tiny.image(0, 64)), "question": QUESTION, "prefix": "three"}
        assert httpx.post(f"{base}/v1/vqa", json=body, timeout=60).json()["answer"] == \
            _expected(tmp_path / "prefixes", "three", 0)
    finally:
        serve.shutdown()
        ray.shutdown()
