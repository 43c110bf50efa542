"""The chat API with the official ``openai`` SDK against real uvicorn servers on 127.0.0.1: usage, token-by-token
streaming with usage, sampling with a seed, n, stop, multi-turn conversations through the chat template, a clear
400 for every field of OpenAI's request that cannot be honoured; a client that leaves mid-stream, a row that
raises, and SIGTERM with rows mid-decode."""

import json
import signal
import threading
import time
import typing

import httpx
import pytest
import torch

import serve_tiny
import tiny
from mmprefix.evaluation import decode
from mmprefix.serving import PrefixService
from mmprefix.serving.chat import choice_seed
from mmprefix.serving.requests import NEUTRAL, ChatRequest
from mmprefix.serving.server import create_app

QUESTION = serve_tiny.QUESTIONS[0]
openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefixes")
    serve_tiny.save_prefixes(path)
    serve_tiny.save_llava_prefixes(path)
    return path


@pytest.fixture(scope="module")
def llava(folder):
    """A server of the embedded LLaVA (a chat template) with the prefixes 'la' and 'lb'."""
    service = PrefixService([serve_tiny.llava_engine()], folder, window=0.05)
    with serve_tiny.ThreadServer(create_app(service)) as server:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def blip(folder):
    """A server of the tiny BLIP heads (no chat template) with the prefixes red, green, blue and cap."""
    service = PrefixService(serve_tiny.blip_engines(), folder, window=0.05)
    with serve_tiny.ThreadServer(create_app(service)) as server:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)


def user(text=None, seed=None):
    content = [{"type": "image_url", "image_url": {"url": serve_tiny.data_uri(serve_tiny.image(seed, 64))}}] \
        if seed is not None else []
    return {"role": "user", "content": content + ([{"type": "text", "text": text}] if text else [])}


# -- answers, usage, streaming -------------------------------------------------------------------------------------
def test_a_chat_vlm_answers_with_usage_and_streams_token_by_token_with_usage_last(llava, folder):
    messages = [user("what color is the circle?", seed=1)]
    alone, tokens, prompt = serve_tiny.llava_alone(folder, "la", serve_tiny.one_turn("what color is the circle?"),
                                                   [serve_tiny.image(1, 64)], max_new_tokens=12)
    reply = llava.chat.completions.create(model="la", messages=messages, max_tokens=12)
    assert reply.choices[0].message.content == alone
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt, tokens)
    assert reply.usage.total_tokens == prompt + tokens and reply.choices[0].finish_reason in ("stop", "length")
    chunks = list(llava.chat.completions.create(model="la", messages=messages, max_tokens=12, stream=True,
                                                stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == alone
    assert len(pieces) == tokens - (reply.choices[0].finish_reason == "stop"), "a piece per token, but the end of text"
    assert [c.usage for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices == [] and (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (prompt, tokens)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason


def test_a_long_answer_streams_a_piece_per_token_as_it_is_decoded(blip):
    ask = dict(model="red", messages=[user(QUESTION, seed=8)], max_tokens=12)
    text = blip.chat.completions.create(**ask).choices[0].message.content
    chunks = list(blip.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == text and len(text.split()) >= 5
    assert len(text.split()) <= len(pieces) <= chunks[-1].usage.completion_tokens, "a piece per token that adds text"


def test_a_multi_turn_conversation_goes_through_the_chat_template(llava, folder):
    messages = [{"role": "system", "content": "answer with colors"}, user("what color is the circle?", seed=2),
                {"role": "assistant", "content": "red"}, user("and the square?")]
    as_template = [{"role": "system", "content": [{"type": "text", "text": "answer with colors"}]},
                   {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the circle?"}]},
                   {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
                   {"role": "user", "content": [{"type": "text", "text": "and the square?"}]}]
    reply = llava.chat.completions.create(model="lb", messages=messages, max_tokens=10)
    alone, tokens, prompt = serve_tiny.llava_alone(folder, "lb", as_template, [serve_tiny.image(2, 64)], max_new_tokens=10)
    assert reply.choices[0].message.content == alone and reply.usage.prompt_tokens == prompt
    last_turn = llava.chat.completions.create(model="lb", messages=[user("and the square?")], max_tokens=10)
    assert last_turn.usage.prompt_tokens < prompt, "every turn was read, not only the last"


def test_a_seed_gives_the_same_answer_alone_and_among_other_requests_and_n_choices(llava):
    ask = dict(model="la", messages=[user("what is there?", seed=3)], max_tokens=12, temperature=2.0, top_p=0.99)
    alone = llava.chat.completions.create(**ask, seed=11).choices[0].message.content
    replies = {}

    def call(key, **extra):
        replies[key] = llava.chat.completions.create(**{**ask, **extra})

    threads = [threading.Thread(target=call, args=(k,), kwargs=kw) for k, kw in
               [("same", {"seed": 11}), ("other", {"seed": 12}), ("greedy", {"temperature": 0}), ("n", {"seed": 11, "n": 3})]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert replies["same"].choices[0].message.content == alone
    assert replies["n"].choices[0].message.content == alone, "the first of n choices is the seed's own answer"
    singles = [llava.chat.completions.create(**ask, seed=choice_seed(11, i)) for i in range(3)]
    assert [c.message.content for c in replies["n"].choices] == [r.choices[0].message.content for r in singles]
    assert replies["n"].usage.completion_tokens == sum(r.usage.completion_tokens for r in singles)
    assert replies["n"].usage.prompt_tokens == singles[0].usage.prompt_tokens
    samples = {llava.chat.completions.create(**ask, seed=s).choices[0].message.content for s in range(20, 28)}
    assert len(samples) > 2, "different seeds draw different answers"
    greedy = llava.chat.completions.create(model="la", messages=ask["messages"], max_tokens=12)
    assert replies["greedy"].choices[0].message.content == greedy.choices[0].message.content


def test_stop_sequences_cut_the_answer_before_them(blip, folder):
    full = blip.chat.completions.create(model="red", messages=[user(QUESTION, seed=4)], max_tokens=12)
    text = full.choices[0].message.content
    stop = " " + text.split()[2]
    reply = blip.chat.completions.create(model="red", messages=[user(QUESTION, seed=4)], max_tokens=12, stop=[stop, "@"])
    assert reply.choices[0].message.content == text[: text.index(stop)] and reply.choices[0].finish_reason == "stop"
    streamed = blip.chat.completions.create(model="red", messages=[user(QUESTION, seed=4)], max_tokens=12, stop=stop,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == reply.choices[0].message.content


def test_blip_reads_one_user_message_and_refuses_conversations_it_cannot_follow(blip, folder):
    answer = blip.chat.completions.create(model="green", messages=[user(QUESTION, seed=5)], max_tokens=6)
    expected = decode.answer_questions(serve_tiny.reference("vqa", "green", folder), tiny.world_blip_processor(),
                                       [serve_tiny.image(5, 64)], [QUESTION], max_new_tokens=6)[0]
    assert answer.choices[0].message.content == expected and answer.usage.prompt_tokens > 2
    for messages in ([{"role": "system", "content": "be brief"}, user(QUESTION, seed=5)],
                     [user(QUESTION, seed=5), {"role": "assistant", "content": "red"}, user("and?")]):
        with pytest.raises(openai.BadRequestError, match="this model has no chat template: it reads one user message"):
            blip.chat.completions.create(model="green", messages=messages)


# -- every field of OpenAI's request -------------------------------------------------------------------------------
NOT_NEUTRAL = {"frequency_penalty": 0.5, "presence_penalty": -1, "logit_bias": {"5": 10}, "logprobs": True,
               "top_logprobs": 2, "response_format": {"type": "json_object"},
               "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto",
               "functions": [{"name": "f"}], "function_call": "auto", "store": True, "service_tier": "flex",
               "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"},
               "prediction": {"type": "content", "content": "x"}, "reasoning_effort": "low", "verbosity": "low",
               "web_search_options": {}, "moderation": {"model": "x"}}
ACCEPTED = {"user": "u1", "safety_identifier": "s", "prompt_cache_key": "k", "metadata": {"a": "b"},
            "parallel_tool_calls": False, "prompt_cache_retention": "24h", "frequency_penalty": 0, "logprobs": False,
            "response_format": {"type": "text"}, "tool_choice": "none", "store": False, "service_tier": "auto",
            "modalities": ["text"], "n": 1, "temperature": 0, "top_p": 1, "seed": 1, "stop": None}


def test_every_field_of_openais_request_is_known_here():
    from openai.types.chat import completion_create_params

    documented = set(typing.get_type_hints(completion_create_params.CompletionCreateParamsBase))
    documented |= set(typing.get_type_hints(completion_create_params.CompletionCreateParamsStreaming))
    assert documented <= set(ChatRequest.model_fields), sorted(documented - set(ChatRequest.model_fields))
    assert set(NOT_NEUTRAL) == set(NEUTRAL)


@pytest.mark.parametrize("field", sorted(NOT_NEUTRAL))
def test_a_field_that_cannot_be_honoured_is_a_clear_400(blip, field):
    with pytest.raises(openai.BadRequestError) as caught:
        blip.chat.completions.create(model="red", messages=[user(QUESTION, seed=0)], **{field: NOT_NEUTRAL[field]})
    message = caught.value.body["message"]
    assert message.startswith(f"{field}=") and "cannot be honoured: " in message and "\n" not in message


def test_neutral_values_and_identifiers_are_accepted_and_unknown_fields_refused(blip):
    reply = blip.chat.completions.create(model="red", messages=[user(QUESTION, seed=0)], max_tokens=4, **ACCEPTED)
    assert reply.choices[0].message.content and reply.usage.completion_tokens >= 1
    for extra, message in (({"top_k": 5}, "unknown field 'top_k'"),
                           ({"stream_options": {"include_usage": True}}, "stream_options needs stream: true")):
        with pytest.raises(openai.BadRequestError, match=message):
            blip.chat.completions.create(model="red", messages=[user(QUESTION, seed=0)], extra_body=extra)
    checks = [({"temperature": 3}, "temperature must be from 0 to 2"), ({"top_p": 0}, "top_p must be above 0"),
              ({"stop": ["a", "b", "c", "d", "e"]}, "send at most 4"), ({"n": 2, "extra_body": {"num_beams": 2}},
                                                                         "n > 1 with num_beams"),
              ({"max_tokens": 40}, "this model's context is 32 positions; the prompt takes 1 and 40 new tokens")]
    for extra, message in checks:
        with pytest.raises(openai.BadRequestError, match=message):
            blip.chat.completions.create(model="red", messages=[user(QUESTION, seed=0)], **extra)
    with pytest.raises(openai.NotFoundError, match="no prefix 'nope'"):
        blip.chat.completions.create(model="nope", messages=[user(QUESTION, seed=0)])


# -- failure modes, on real servers --------------------------------------------------------------------------------
def _caption_server(folder, **service_options):
    service = PrefixService(serve_tiny.endless_caption_engines(), folder, window=0.05, **service_options)
    return service, serve_tiny.StepGate(service.engines["blip-caption"], at=3)


def _endless_alone(service, seed, prefix=None):
    return decode.caption_images(service.engines["blip-caption"].model, tiny.world_blip_processor(),
                                 [serve_tiny.image(seed, 64)], max_new_tokens=20, prefix=prefix)[0]


def test_a_client_that_leaves_mid_stream_leaves_the_batch_and_the_others_finish_unchanged(folder):
    service, gate = _caption_server(folder)
    with serve_tiny.ThreadServer(create_app(service)) as server:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)
        answers = {}

        def stay(seed, prefix):
            stream = client.chat.completions.create(model=prefix, messages=[user(seed=seed)], max_tokens=20, stream=True)
            answers[seed] = "".join(c.choices[0].delta.content or "" for c in stream)

        stayers = [threading.Thread(target=stay, args=(s, p)) for s, p in ((1, "cap"), (2, "base"))]
        for thread in stayers:
            thread.start()
        leaving = client.chat.completions.create(model="cap", messages=[user(seed=3)], max_tokens=20, stream=True)
        next(iter(leaving))
        assert gate.reached.wait(300)
        leaving.close()  # the client goes away while its row is mid-decode
        time.sleep(0.5)
        gate.release.set()
        for thread in stayers:
            thread.join(300)
        metrics = httpx.get(f"http://127.0.0.1:{server.port}/metrics").text
    assert 'mmprefix_requests_total{outcome="cancelled",task="caption"} 1.0' in metrics
    assert 'mmprefix_requests_total{outcome="ok",task="caption"} 2.0' in metrics
    assert answers == {1: _endless_alone(service, 1, "cap"), 2: _endless_alone(service, 2)}


def test_a_row_that_raises_gets_a_500_and_the_rows_beside_it_their_answers(folder):
    engines = serve_tiny.blip_engines()
    model = engines[0].model
    model.load_prefix("broken", folder / "green")
    site = next(iter(model.prefixes["broken"].keys))
    model.prefixes["broken"].keys[site] = torch.nn.Parameter(torch.zeros(1, 3, 5))
    service = PrefixService(engines, folder, window=0.3)
    with serve_tiny.ThreadServer(create_app(service)) as server:
        base, replies = f"http://127.0.0.1:{server.port}/v1/chat/completions", {}

        def ask(model):
            body = {"model": model, "messages": [user(QUESTION, seed=6)], "max_tokens": 6}
            replies[model] = httpx.post(base, json=body, timeout=60)

        threads = [threading.Thread(target=ask, args=(m,)) for m in ("broken", "red", "base")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert replies["broken"].status_code == 500 and "does not fit" in replies["broken"].json()["error"]["message"]
    for model in ("red", "base"):
        expected = decode.answer_questions(serve_tiny.reference("vqa", None if model == "base" else model, folder),
                                           tiny.world_blip_processor(), [serve_tiny.image(6, 64)], [QUESTION],
                                           max_new_tokens=6)[0]
        assert replies[model].json()["choices"][0]["message"]["content"] == expected


def test_sigterm_lets_rows_mid_decode_finish_and_answers_new_requests_with_503(folder):
    service, gate = _caption_server(folder)
    server = serve_tiny.ThreadServer(create_app(service), service).__enter__()
    try:
        base = f"http://127.0.0.1:{server.port}"
        streamed = {}

        def stream():
            body = {"model": "cap", "messages": [user(seed=7)], "max_tokens": 20, "stream": True}
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as response:
                lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
            streamed["text"] = "".join(json.loads(x)["choices"][0]["delta"].get("content", "") for x in lines[:-1]
                                       if json.loads(x).get("choices"))

        reader = threading.Thread(target=stream)
        reader.start()
        assert gate.reached.wait(300)
        server.server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
        refused = httpx.post(f"{base}/v1/captions", json={"image": serve_tiny.data_uri(serve_tiny.image(0))}, timeout=30)
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        assert not server.server.should_exit, "the server keeps answering while rows decode"
        gate.release.set()
        reader.join(300)
        server.thread.join(30)
        assert not server.thread.is_alive(), "the server exits once the rows have finished"
    finally:
        gate.release.set()
        server.__exit__(None, None, None)
    assert streamed["text"] == _endless_alone(service, 7, "cap")
