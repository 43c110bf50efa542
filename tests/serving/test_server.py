"""The HTTP server: OpenAI-compatible chat (with the openai client), task endpoints, health, metrics, admin;
every bad input of the issue gets its status and a one-line message, and the server keeps serving. Servers bind
127.0.0.1 only; every request goes to loopback (or stays in process)."""

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import serve_tiny
import tiny
from mmprefix import PrefixConfig, PrefixModel, add_prefix, load_prefix
from mmprefix.embedded import load_backbone
from mmprefix.evaluation import decode
from mmprefix.serving import Engine, PrefixService
from mmprefix.serving.server import Limits, create_app

QUESTION = serve_tiny.QUESTIONS[0]
TOKEN = "s3cret"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefixes")
    serve_tiny.save_prefixes(path)
    return path


def client_for(folder, engines=None, limits=None, window=0.05, batching="step", **options):
    service = PrefixService(engines or serve_tiny.blip_engines(), folder, window=window, batching=batching)
    return TestClient(create_app(service, admin_token=TOKEN, limits=limits, **options))


@pytest.fixture(scope="module")
def client(folder):
    with client_for(folder) as client:
        yield client


expected_answer = serve_tiny.expected_answer
ThreadServer = serve_tiny.ThreadServer


def chat_body(model, seed, text=QUESTION, **extra):
    content = [{"type": "image_url", "image_url": {"url": serve_tiny.data_uri(serve_tiny.image(seed))}}]
    if text:
        content.insert(0, {"type": "text", "text": text})
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def error_of(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and "\n" not in error["message"]
    return error["message"]


# -- what users call -------------------------------------------------------------------------------------------
def test_openai_client_lists_models_chats_and_streams(client, folder):
    from openai import OpenAI

    openai = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    assert sorted(m.id for m in openai.models.list().data) == ["base", "blue", "cap", "green", "red"]
    for model, seed in (("red", 0), ("base", 1), ("blue", 2)):
        reply = openai.chat.completions.create(**chat_body(model, seed), max_tokens=6)
        assert reply.choices[0].message.content == expected_answer(folder, None if model == "base" else model, seed,
                                                                    max_new_tokens=6)
    stream = openai.chat.completions.create(**chat_body("cap", 3, text=None), max_tokens=10, stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream]
    assert "".join(pieces) == expected_answer(folder, "cap", 3, question=None, max_new_tokens=10)
    assert sum(1 for p in pieces if p) >= 2, "the caption arrives in pieces"


def test_chat_requests_sent_together_share_a_batch_and_keep_their_own_prefix(folder):
    with client_for(folder, window=0.5) as client:
        models, replies = ["red", "green", "base", "blue"], {}

        def ask(model):
            replies[model] = client.post("/v1/chat/completions", json=chat_body(model, 5)).json()

        threads = [threading.Thread(target=ask, args=(m,)) for m in models]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for model in models:
            answer = replies[model]["choices"][0]["message"]["content"]
            assert answer == expected_answer(folder, None if model == "base" else model, 5)
        metrics = client.get("/metrics").text
        steps = _sample(metrics, "mmprefix_batch_size_count", model="blip-vqa")
        assert _sample(metrics, "mmprefix_batch_size_bucket", model="blip-vqa", le="1.0") < steps, "rows share steps"


def test_task_endpoints_answer_as_the_prefix_alone(client, folder):
    image = serve_tiny.data_uri(serve_tiny.image(7))
    vqa = client.post("/v1/vqa", json={"image": image, "question": QUESTION, "prefix": "green", "num_beams": 2})
    assert vqa.json()["answer"] == expected_answer(folder, "green", 7, num_beams=2)
    caption = client.post("/v1/captions", json={"image": image, "prefix": "cap", "max_new_tokens": 5}).json()
    assert caption["caption"] == expected_answer(folder, "cap", 7, question=None, max_new_tokens=5)
    assert caption["prefix"] == "cap" and caption["latency_ms"] > 0
    used = caption["usage"]
    assert used["prompt_tokens"] == 1 and 1 <= used["completion_tokens"] <= 5  # [DEC], then up to 5 tokens
    assert used["total_tokens"] == used["prompt_tokens"] + used["completion_tokens"]
    jpeg = client.post("/v1/vqa", json={"image": serve_tiny.data_uri(serve_tiny.image(7), "JPEG")[23:],
                                        "question": QUESTION})  # bare base64 works too
    assert jpeg.status_code == 200


def test_clip_endpoints_features_embeddings_and_classification(tmp_path):
    processor = tiny.world_clip_processor()
    model = add_prefix(tiny.clip(), PrefixConfig(num_virtual_tokens=3, init_std=1.0), name="x")
    model.save_prefix(tmp_path / "warm")
    engine = Engine(PrefixModel(tiny.clip()), processor, "clip")
    with client_for(tmp_path, [engine]) as client:
        image = serve_tiny.image(1)
        body = {"image": serve_tiny.data_uri(image), "text": "a red circle", "prefix": "warm"}
        features = client.post("/v1/features", json=body).json()
        reference = PrefixModel(tiny.clip())
        reference.load_prefix("warm", tmp_path / "warm")
        from mmprefix.evaluation.contrastive import _ClipEncoder

        encoder = _ClipEncoder(reference, processor)
        torch.testing.assert_close(torch.tensor(features["image_features"]), encoder.images([image])[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor(features["text_features"]), encoder.texts(["a red circle"])[0],
                                   rtol=1e-5, atol=1e-5)
        embeddings = client.post("/v1/embeddings", json={"model": "warm", "input": ["a red circle", "blue"]}).json()
        assert embeddings["data"][0]["embedding"] == pytest.approx(features["text_features"], abs=1e-6)
        result = client.post("/v1/classify", json={"image": body["image"], "prefix": "warm",
                                                   "classnames": ["red circle", "blue square"]}).json()
        assert set(result["scores"]) == {"red circle", "blue square"}
        assert sum(result["scores"].values()) == pytest.approx(1.0)
        assert result["label"] == max(result["scores"], key=result["scores"].get)
        assert error_of(client.post("/v1/vqa", json={"image": body["image"], "question": "what?"}), 400) == \
            "no served model does 'vqa'; this server does ['classify', 'image_features', 'text_features']"


def test_health_metrics_and_page(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["models"]["red"] == ["vqa"] and health["models"]["cap"] == ["caption"]
    client.post("/v1/vqa", json={"image": serve_tiny.data_uri(serve_tiny.image(0)), "question": QUESTION})
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    names = {family.name for family in text_string_to_metric_families(metrics.text)}
    assert {"mmprefix_requests", "mmprefix_request_seconds", "mmprefix_batch_size", "mmprefix_queued_requests",
            "mmprefix_prefixes", "mmprefix_http_responses"} <= names
    assert _sample(metrics.text, "mmprefix_requests_total", task="vqa", outcome="ok") >= 1
    assert _sample(metrics.text, "mmprefix_prefixes") == 4
    page = client.get("/")
    assert page.status_code == 200 and "Compare prefixes" in page.text


def _sample(text, name, **labels):
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


# -- bad input: a clear error, nothing lost, the server keeps serving ---------------------------------------
def _png_bytes(size=32):
    buffer = io.BytesIO()
    serve_tiny.image(0, size).save(buffer, "PNG")
    return buffer.getvalue()


BAD_REQUESTS = {
    "unknown prefix": ("/v1/vqa", {"prefix": "nope"}, 404,
                       "no prefix 'nope' for vqa; prefixes for vqa: ['blue', 'green', 'red'] (and 'base')"),
    "prefix of another task": ("/v1/vqa", {"prefix": "cap"}, 404, "no prefix 'cap' for vqa"),
    "prefix with a path separator": ("/v1/vqa", {"prefix": "red/../../etc"}, 400, "invalid prefix name 'red/../../etc'"),
    "prefix with ..": ("/v1/chat/completions", {"model": ".."}, 400, "invalid prefix name '..'"),
    "image that is not base64": ("/v1/vqa", {"image": "data:image/png;base64,@@@"}, 400, "the image is not valid base64"),
    "bytes that are not an image": ("/v1/vqa", {"image": base64.b64encode(b"hello world, no image").decode()}, 400,
                                    "the image does not decode: UnidentifiedImageError"),
    "truncated image": ("/v1/vqa", {"image": base64.b64encode(_png_bytes(64)[:300]).decode()}, 400,
                        "the image does not decode"),
    "image URL": ("/v1/vqa", {"image": "https://example.com/cat.png"}, 400, "this server fetches no URLs"),
    "image over the byte limit": ("/v1/vqa", {"image": base64.b64encode(_png_bytes(96)).decode()}, 413,
                                  "the image is over 20000 bytes"),
    "image over the pixel limit": ("/v1/vqa", {"image": base64.b64encode(_png_bytes(70)).decode()}, 413,
                                   "the image is 70x70 pixels; this server takes at most 4096 pixels"),
    "body over the limit": ("/v1/vqa", {"question": "x" * 60_000}, 413, "the request body is over 50000 bytes"),
    "too many tokens": ("/v1/vqa", {"question": "what " * 40}, 400, "the text has 42 tokens; this server takes at most 32"),
    "too many tokens in a chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what " * 40}, {"type": "image_url", "image_url": {"url": serve_tiny.data_uri(serve_tiny.image(0))}}]}]},
        400, "the text has 42 tokens; this server takes at most 32"),
    "too many new tokens": ("/v1/vqa", {"max_new_tokens": 1000}, 400, "max_new_tokens must be an integer from 1 to 64"),
    "sampling": ("/v1/vqa", {"do_sample": True}, 422, "do_sample: Extra inputs are not permitted"),
    "missing field": ("/v1/vqa", {"question": None}, 422, "question: Field required"),
    "field of the wrong type": ("/v1/vqa", {"num_beams": "two"}, 422, "num_beams: Input should be a valid integer"),
    "too many choices": ("/v1/chat/completions", {"n": 9}, 400, "n=9: this server returns from 1 to 8 choices per request"),
    "no user message": ("/v1/chat/completions", {"messages": [{"role": "system", "content": "hi"}]}, 400,
                        "messages hold no user message"),
    "text task on an image server": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400,
                                     "no served model does 'text'"),
}


@pytest.fixture(scope="module")
def strict_client(folder):
    limits = Limits(max_body_bytes=50_000, max_image_bytes=20_000, max_image_pixels=64 * 64, max_input_tokens=32)
    with client_for(folder, limits=limits) as client:
        yield client


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_gets_its_status_and_a_one_line_message(strict_client, case):
    path, change, status, message = BAD_REQUESTS[case]
    image = serve_tiny.data_uri(serve_tiny.image(0))
    body = chat_body("red", 0) if path.endswith("completions") else {"image": image, "question": QUESTION}
    body.update(change)
    body = {k: v for k, v in body.items() if v is not None}
    assert message in error_of(strict_client.post(path, json=body), status)
    good = strict_client.post("/v1/vqa", json={"image": image, "question": QUESTION, "prefix": "red"})
    assert good.status_code == 200, "the server keeps serving"


def test_malformed_json_is_a_422_naming_the_position(client):
    response = client.post("/v1/vqa", content=b'{"image": "x", "question": ', headers={"content-type": "application/json"})
    assert re.fullmatch(r"the body is not valid JSON \(.+, at character \d+\)", error_of(response, 422))


def test_admin_needs_the_token_and_checks_names(folder):
    with client_for(folder) as client:
        assert "Authorization: Bearer" in error_of(client.delete("/admin/prefixes/red"), 401)
        assert "Authorization: Bearer" in error_of(client.delete("/admin/prefixes/red",
                                                                 headers={"authorization": "Bearer wrong"}), 401)
        auth = {"authorization": f"Bearer {TOKEN}"}
        for name in ("..", "../red", "a/b", "a.b", "base"):
            quoted = name.replace(".", "%2E").replace("/", "%2F")  # sent as is, not resolved by the client
            assert f"invalid prefix name {name!r}" in error_of(client.post(f"/admin/prefixes/{quoted}", headers=auth), 400)
        assert "no prefix 'nope'" in error_of(client.delete("/admin/prefixes/nope", headers=auth), 404)
    service = PrefixService(serve_tiny.blip_engines(), folder)
    with TestClient(create_app(service)) as client:  # no token configured: admin is off
        assert "start the server with --admin-token" in error_of(client.post("/admin/rescan"), 403)


def test_hot_remove_and_add_never_interrupt_requests_in_flight(folder, tmp_path):
    import shutil

    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    auth = {"authorization": f"Bearer {TOKEN}"}
    with client_for(tmp_path, window=0.6) as client:
        results = {}

        def ask(i):
            body = {"image": serve_tiny.data_uri(serve_tiny.image(i)), "question": QUESTION, "prefix": "red"}
            results[i] = client.post("/v1/vqa", json=body)

        in_flight = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for thread in in_flight:
            thread.start()
        time.sleep(0.2)  # accepted, waiting in the window
        assert client.delete("/admin/prefixes/red", headers=auth).json() == {"name": "red", "removed": True}
        for thread in in_flight:
            thread.join()
        for i, response in results.items():
            assert response.status_code == 200 and response.json()["answer"] == expected_answer(tmp_path, "red", i)
        assert "no prefix 'red'" in error_of(client.post("/v1/vqa", json={"image": serve_tiny.data_uri(
            serve_tiny.image(0)), "question": QUESTION, "prefix": "red"}), 404)
        assert client.post("/admin/prefixes/red", headers=auth).json() == {"name": "red", "models": ["blip-vqa"]}
        (tmp_path / "junk").mkdir()
        (tmp_path / "junk" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
        (tmp_path / "junk" / "adapter_model.safetensors").write_bytes(b"\0" * 8)
        assert "prefix 'junk' not loaded" in error_of(client.post("/admin/prefixes/junk", headers=auth), 422)
        report = client.post("/admin/rescan", headers=auth).json()
        assert "junk" in report["problems"] and report["added"] == []
        assert client.get("/v1/models").status_code == 200 and "red" in client.get("/health").json()["models"]


def test_a_corrupt_prefix_folder_at_start_is_reported_and_the_rest_is_served(folder, tmp_path):
    import shutil

    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    (tmp_path / "cut").mkdir()
    whole = (folder / "red" / "prefix.safetensors").read_bytes()
    (tmp_path / "cut" / "prefix.safetensors").write_bytes(whole[: len(whole) // 2])  # a copy cut short
    (tmp_path / "half").mkdir()  # a name torch's ModuleDict reserves
    shutil.copy(folder / "red" / "prefix.safetensors", tmp_path / "half")
    with client_for(tmp_path) as client:
        health = client.get("/health").json()
        assert "damaged or cut short" in health["problems"]["cut"]
        assert "nn.ModuleDict" in health["problems"]["half"]
        assert sorted(health["models"]) == ["base", "blue", "cap", "green", "red"]


def test_periodic_rescan_picks_up_a_new_prefix_folder(folder, tmp_path):
    with client_for(tmp_path, rescan_seconds=0.2) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["base"]
        import shutil

        shutil.copytree(folder / "green", tmp_path / "fresh")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "fresh" not in client.get("/health").json()["models"]:
            time.sleep(0.1)
        assert "fresh" in client.get("/health").json()["models"]


class FailingEngine(Engine):
    def run(self, jobs):
        if any(job.text == "boom?" for job in jobs):
            raise RuntimeError("kernel failure")
        return super().run(jobs)


def test_an_exception_inside_one_request_level_batch_fails_that_batch_with_500_only(folder):
    vqa, _ = serve_tiny.blip_heads()
    engine = FailingEngine(PrefixModel(vqa), tiny.world_blip_processor(), "blip-vqa")
    with client_for(folder, [engine], window=0.4, batching="request") as client:
        image = serve_tiny.data_uri(serve_tiny.image(0))
        results = {}

        def ask(question):
            results[question] = client.post("/v1/vqa", json={"image": image, "question": question})

        questions = ["boom?", "what?", "what is red?"]  # the first two share a batch (same length)
        threads = [threading.Thread(target=ask, args=(q,)) for q in questions]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for question in questions[:2]:
            assert error_of(results[question], 500) == \
                "the batch this request ran in failed: RuntimeError: kernel failure"
        assert results["what is red?"].status_code == 200
        assert client.post("/v1/vqa", json={"image": image, "question": "what?"}).status_code == 200


# -- real servers on loopback ---------------------------------------------------------------------------------
def test_a_client_that_disconnects_mid_request_is_dropped_and_the_server_keeps_serving(folder):
    service = PrefixService(serve_tiny.blip_engines(), folder, window=1.0)
    with ThreadServer(create_app(service)) as server:
        body = json.dumps({"image": serve_tiny.data_uri(serve_tiny.image(0)), "question": QUESTION}).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            raw.sendall(b"POST /v1/vqa HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            time.sleep(0.3)  # accepted, waiting in the window; then the client goes away
        base = f"http://127.0.0.1:{server.port}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            metrics = httpx.get(f"{base}/metrics").text
            if _sample(metrics, "mmprefix_requests_total", task="vqa", outcome="cancelled") == 1:
                break
            time.sleep(0.1)
        assert _sample(metrics, "mmprefix_requests_total", task="vqa", outcome="cancelled") == 1
        assert _sample(metrics, "mmprefix_batch_size_count", model="blip-vqa") == 0, "its batch never ran"
        reply = httpx.post(f"{base}/v1/vqa", json={"image": serve_tiny.data_uri(serve_tiny.image(0)),
                                                  "question": QUESTION}, timeout=30)
        assert reply.status_code == 200


@pytest.mark.slow  # a fresh process: imports and model loading take ~10 s
def test_mmprefix_serve_with_no_model_serves_the_embedded_blip_and_the_recipe_prefixes_then_sigterm_finishes(tmp_path):
    """The VQA recipe's output (out/vqa/prefix/prefix: the prefix run of task vqa) is served as 'vqa'; the serving
    guide's curl and OpenAI-client examples get the answer of that prefix alone; after SIGTERM the request in
    flight finishes, a new one gets 503, then the process exits."""
    model, processor = load_backbone("blip", "vqa")
    torch.manual_seed(0)
    add_prefix(model, PrefixConfig(num_virtual_tokens=4, init_std=0.5)).save_prefix(tmp_path / "out" / "vqa" / "prefix" / "prefix")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "mmprefix.cli", "serve", "--port", "0", "--window-ms", "1500"],
                               cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        port, log, reader = _port_from_log(process)
        base = f"http://127.0.0.1:{port}"
        assert sorted(m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]) == ["base", "vqa"]
        serve_tiny.image(5, 64).save(tmp_path / "shapes.png")
        expected = decode.answer_questions(load_prefix(load_backbone("blip", "vqa")[0], tmp_path / "out" / "vqa" / "prefix" / "prefix"),
                                           processor, [serve_tiny.image(5, 64)], ["how many shapes are there?"])[0]
        curl, client = readme_serving_examples(port)
        answer = json.loads(subprocess.run(["bash", "-c", curl], cwd=tmp_path, capture_output=True, text=True,
                                           check=True, timeout=60).stdout)["answer"]
        assert answer == expected
        printed = subprocess.run([sys.executable, "-c", client], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert printed.stdout.strip() == expected, printed.stderr
        image = serve_tiny.data_uri(serve_tiny.image(0, 64))
        reply = {}

        def ask():
            reply["response"] = httpx.post(f"{base}/v1/vqa", json={"image": image, "question": "how many shapes are there?",
                                                                   "prefix": "vqa"}, timeout=60)

        asking = threading.Thread(target=ask)
        asking.start()
        time.sleep(0.7)  # the request waits in its 1.5 s window
        process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        refused = httpx.post(f"{base}/v1/vqa", json={"image": image, "question": "how many shapes are there?"}, timeout=60)
        assert refused.status_code == 503, refused.text
        asking.join(60)
        assert reply["response"].status_code == 200 and isinstance(reply["response"].json()["answer"], str)
        # uvicorn finishes the requests in flight, shuts the app down, then exits by the signal it caught
        assert process.wait(60) in (0, -signal.SIGTERM)
        reader.join(10)
        assert "Application shutdown complete" in "".join(log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def readme_serving_examples(port: int) -> tuple[str, str]:
    """The serving guide's curl command and OpenAI-client example, pointed at ``port``."""
    guide = (Path(__file__).resolve().parents[2] / "docs" / "guides" / "serving.md").read_text()
    curl = next(block for block in re.findall(r"```sh\n(.*?)```", guide, flags=re.S) if block.startswith("curl"))
    client = re.search(r"```py\n(.*?)```", guide, flags=re.S).group(1)
    return (curl.replace("127.0.0.1:8000", f"127.0.0.1:{port}"), client.replace("127.0.0.1:8000", f"127.0.0.1:{port}"))


def _port_from_log(process, seconds=120):
    deadline, lines = time.monotonic() + seconds, []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            break
        lines.append(line)
        found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
        if found:  # keep reading the log, so that the pipe never fills
            reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
            reader.start()
            return int(found.group(1)), lines, reader
    raise AssertionError("the server did not start:\n" + "".join(lines))
