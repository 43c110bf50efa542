"""What a hostile or careless client sends gets the documented error shape and status, and never holds up the
requests of others: bodies that do not parse, unknown routes and methods, decompression bombs, huge texts; and the
`mmprefix serve` flags that could not work are refused before a model loads."""

import asyncio
import base64
import struct
import zlib

import pytest
from fastapi.testclient import TestClient

import serve_tiny
import tiny
from mmprefix import PrefixModel, cli
from mmprefix.serving import Engine, PrefixService
from mmprefix.serving.server import Limits, create_app

QUESTION = serve_tiny.QUESTIONS[0]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prefixes")
    serve_tiny.save_prefixes(folder)
    service = PrefixService(serve_tiny.blip_engines(), folder, window=0.01)
    with TestClient(create_app(service)) as client:
        client.service = service
        yield client


def error_of(response, status):
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"}, response.text
    error = response.json()["error"]
    assert error["code"] == status and "\n" not in error["message"]
    return error["message"]


def answers(client):
    body = {"image": serve_tiny.data_uri(serve_tiny.image(0)), "question": QUESTION, "prefix": "red"}
    return client.post("/v1/vqa", json=body).status_code == 200


JSON = {"content-type": "application/json"}


@pytest.mark.parametrize("method, path, content, status, message", [
    ("POST", "/v1/vqa", b'\xff\xfe{"question": 1}', 422, "the body is not valid JSON (not UTF-8 text"),
    ("POST", "/v1/vqa", b"[" * 100_000 + b"]" * 100_000, 422, "the body is not valid JSON for this server (it nests too "
                                                             "deeply)"),
    ("GET", "/v2/vqa", None, 404, "no endpoint GET /v2/vqa (see /docs)"),
    ("PUT", "/v1/vqa", b"{}", 405, "/v1/vqa takes POST, not PUT"),
    ("DELETE", "/health", None, 405, "/health takes GET"),
])
def test_bodies_routes_and_methods_fastapi_would_answer_get_this_apis_error_shape(client, method, path, content, status,
                                                                                  message):
    """Before: FastAPI's {"detail": ...} ("There was an error parsing the body", "Not Found")."""
    response = client.request(method, path, content=content, headers=JSON)
    assert message in error_of(response, status)
    assert answers(client), "the server keeps serving"


def png_header_only(width, height):
    """A PNG that claims ``width`` x ``height`` pixels in a few hundred bytes (what a decompression bomb sends)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [5000, 30000])
def test_an_image_over_the_pixel_limit_is_413_even_one_pillow_refuses_to_open(client, side):
    """Before: 30000x30000 got 400 "DecompressionBombError" (Pillow refuses it at open), 5000x5000 got 413."""
    image = base64.b64encode(png_header_only(side, side)).decode()
    message = error_of(client.post("/v1/vqa", json={"image": image, "question": QUESTION}), 413)
    assert message in (f"the image is {side}x{side} pixels; this server takes at most {4096 * 4096} pixels",
                       f"the image has {side * side} pixels; this server takes at most {4096 * 4096} pixels")


def test_a_huge_single_word_is_refused_by_its_length_before_it_is_tokenised(client, monkeypatch):
    """One 4 MB word is one token: it passed --max-input-tokens and held every other request for seconds while it
    was tokenised (twice) and run."""
    seen = []
    for engine in client.service.engines.values():
        real = engine.token_count
        monkeypatch.setattr(engine, "token_count", lambda text, real=real: seen.append(len(text)) or real(text))
    word = "a" * (4 * 2**20)
    message = error_of(client.post("/v1/vqa", json={"image": serve_tiny.data_uri(serve_tiny.image(0)),
                                                    "question": word}), 400)
    assert message == f"the text has {len(word)} characters; this server takes at most {16 * 256}"
    assert seen == [], "never tokenised"
    image = {"type": "image_url", "image_url": {"url": serve_tiny.data_uri(serve_tiny.image(0))}}
    over = {"model": "red", "messages": [{"role": "user", "content": [image, {"type": "text", "text": "a" * 4097}]}]}
    assert error_of(client.post("/v1/chat/completions", json=over), 400).startswith("the text has 4097 characters")
    fits = {"image": image["image_url"]["url"], "question": "a" * 4096}
    assert client.post("/v1/vqa", json=fits).status_code == 200 and 4096 in seen


def test_texts_are_tokenised_off_the_event_loop(tmp_path, monkeypatch):
    """A long text tokenised in the event loop held up every other request's reading and submission."""
    engine = Engine(PrefixModel(tiny.clip()), tiny.world_clip_processor(), "clip")
    in_loop = []

    def token_count(text, real=engine.token_count):
        try:
            asyncio.get_running_loop()
            in_loop.append(text)
        except RuntimeError:
            pass
        return real(text)

    monkeypatch.setattr(engine, "token_count", token_count)
    with TestClient(create_app(PrefixService([engine], None), limits=Limits(max_input_tokens=32))) as client:
        image = serve_tiny.data_uri(serve_tiny.image(1))
        assert client.post("/v1/features", json={"text": "a red circle"}).status_code == 200
        assert client.post("/v1/classify", json={"image": image, "classnames": ["red", "blue"]}).status_code == 200
        assert client.post("/v1/embeddings", json={"model": "base", "input": ["a", "b"]}).status_code == 200
    assert in_loop == []


def test_limits_below_one_are_refused():
    with pytest.raises(ValueError, match="limits must be >= 1, got max_input_tokens=0"):
        Limits(max_input_tokens=0)
    assert Limits(max_input_tokens=10).max_input_chars == 160 and Limits(max_input_chars=5).max_input_chars == 5


@pytest.mark.parametrize("argv, words", [
    (["--port", "99999"], "argument --port: expected a whole number from 0 to 65535, got 99999"),
    (["--port", "http"], "argument --port: expected a whole number, got 'http'"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: expected a whole number >= 1, got 0"),
    (["--max-beams", "-1"], "argument --max-beams: expected a whole number >= 1, got -1"),
    (["--max-input-chars", "0"], "argument --max-input-chars: expected a whole number >= 1, got 0"),
    (["--window-ms", "-5"], "argument --window-ms: expected a number >= 0, got -5"),
])
def test_serve_flags_that_cannot_work_are_refused_at_once(argv, words, capsys):
    """Before: --port 99999 ended in an OverflowError traceback after the model loaded; --max-new-tokens 0 started a
    server that could not answer."""
    with pytest.raises(SystemExit) as exit:
        cli.main(["serve", *argv])
    assert exit.value.code == 2 and words in capsys.readouterr().err


def test_a_missing_prefix_folder_is_refused_or_said(tmp_path, monkeypatch, capsys):
    """Before: a mistyped --prefixes served the base model without a word."""
    from mmprefix.serving import server

    started = []
    monkeypatch.setattr(server, "run", lambda *args, **kwargs: started.append(args))
    assert cli.main(["serve", "--prefixes", str(tmp_path / "typo")]) == 2 and not started
    assert f"--prefixes {tmp_path / 'typo'} is not a folder" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert cli.main(["serve"]) == 0 and started[0][1] == "out"
    assert "no folder out here (the default --prefixes): serving the base model alone" in capsys.readouterr().err
