"""Step-level (continuous) batching without HTTP: requests join a running batch at the next decoding step and
leave it when they finish, each row with its own prefix, prompt length and position, and every answer equals
the same request run alone on a model that carries only its prefix (greedy; with sampling, the same seed alone);
rows that end at their first token; request-level batching beside it. (Failure modes: test_continuous_failures.py.)"""

import time

import pytest
import torch

import serve_tiny
import tiny
from mmprefix import PrefixConfig, add_prefix
from mmprefix.evaluation import decode
from mmprefix.serving import Engine, Job, PrefixService

QUESTIONS = serve_tiny.MIXED_QUESTIONS


def waves(service, jobs, sizes, worker):
    """Submit ``jobs`` in waves of ``sizes``, each once the rows of the one before are decoding."""
    futures, start = [], 0
    for size in sizes:
        futures += [service.submit(job) for job in jobs[start : start + size]]
        start += size
        deadline = time.monotonic() + 30
        while worker.running == 0 and not all(f.done() for f in futures) and time.monotonic() < deadline:
            time.sleep(0.002)
    return futures


# -- BLIP: the text decoder's cross-attention over each row's own question or image ----------------------------
def test_blip_questions_of_every_length_join_and_leave_one_running_batch_and_equal_each_alone(blip_folder):
    service = PrefixService(serve_tiny.blip_engines(), blip_folder, max_batch_size=16, window=0.05)
    engine = service.engines["blip-vqa"]
    spy = serve_tiny.StepGate(engine, worker=service.batchers["blip-vqa"])
    try:
        names = ["red", None, "green", "blue", "red", None, "blue", "green", None, "red"]
        jobs = [Job("vqa", name, serve_tiny.image(i), QUESTIONS[i % 4], generation=(("max_new_tokens", 12),))
                for i, name in enumerate(names)]
        futures = waves(service, jobs, [3, 3, 4], service.batchers["blip-vqa"])
        answers = [f.result(300) for f in futures]
    finally:
        service.close()
    processor = tiny.world_blip_processor()
    for i, (name, answer) in enumerate(zip(names, answers)):
        alone = decode.answer_questions(serve_tiny.reference("vqa", name, blip_folder), processor, [serve_tiny.image(i)],
                                        [QUESTIONS[i % 4]], max_new_tokens=12)[0]
        assert answer == alone, (i, name)
    assert len(set(answers)) > 3, "prefixes and questions must change the answers, or the test proves nothing"
    assert any(rows > 1 and cross for rows, _, cross in spy.steps), "questions of different lengths share steps"
    assert any(n > 0 for n in spy.joined_running), "rows join while others decode"
    assert sum(spy.prefills) == len(jobs), "each row is prefilled once: the cache of rows that stay is kept"
    assert max(rows for rows, _, _ in spy.steps) > 3


def test_blip_captions_step_with_rows_of_other_lengths_and_equal_each_alone(blip_folder):
    service = PrefixService(serve_tiny.blip_engines(), blip_folder, window=0.05)
    spy = serve_tiny.StepGate(service.engines["blip-caption"], worker=service.batchers["blip-caption"])
    try:
        names = ["cap", None, "cap", None, "cap"]
        jobs = [Job("caption", name, serve_tiny.image(i), generation=(("max_new_tokens", 14),)) for i, name in enumerate(names)]
        answers = [f.result(300) for f in waves(service, jobs, [2, 2, 1], service.batchers["blip-caption"])]
    finally:
        service.close()
    for i, (name, answer) in enumerate(zip(names, answers)):
        assert answer == serve_tiny.expected_answer(blip_folder, name, i, question=None, max_new_tokens=14), (i, name)
    assert any(rows > 1 and padded for rows, padded, _ in spy.steps), "rows of different lengths share steps"


# -- decoder-only models: the embedded LLaVA and a causal LM -----------------------------------------------------
def test_llava_rows_with_their_own_prefix_prompt_length_and_position_equal_each_alone(tmp_path):
    serve_tiny.save_llava_prefixes(tmp_path)
    service = PrefixService([serve_tiny.llava_engine()], tmp_path, window=0.05)
    spy = serve_tiny.StepGate(service.engines["llava"], worker=service.batchers["llava"])
    conversation = ({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is it?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
                    {"role": "user", "content": [{"type": "text", "text": "how many shapes are there?"}]})
    jobs, names = [], ["la", None, "lb", "la", None, "lb", "la"]
    for i, name in enumerate(names):
        settings = (("max_new_tokens", 10),)
        if i % 3 == 2:
            jobs.append(Job("chat", name, generation=settings, messages=conversation, images=(serve_tiny.image(i, 64),)))
        else:
            jobs.append(Job("vqa", name, serve_tiny.image(i, 64), QUESTIONS[i % 4], generation=settings))
    try:
        answers = [f.result(300) for f in waves(service, jobs, [3, 2, 2], service.batchers["llava"])]
    finally:
        service.close()
    for name, job, answer in zip(names, jobs, answers):
        messages, images = (job.messages, job.images) if job.task == "chat" else (serve_tiny.one_turn(job.text), [job.image])
        alone, tokens, prompt = serve_tiny.llava_alone(tmp_path, name, messages, images, max_new_tokens=10)
        assert (answer, answer.completion_tokens, answer.prompt_tokens) == (alone, tokens, prompt), (name, job.task)
    assert len(set(answers)) > 2
    assert any(rows > 1 and padded for rows, padded, _ in spy.steps), "prompts of different lengths share steps"
    assert any(n > 0 for n in spy.joined_running)


def test_a_causal_lm_continues_prompts_step_by_step_as_each_alone():
    from mmprefix.embedded import text

    tokenizer = text.lm_tokenizer()
    model = add_prefix(tiny.world_llama(), PrefixConfig(num_virtual_tokens=3, init_std=1.0), name="a")
    torch.manual_seed(4)
    model.add_prefix("b", PrefixConfig(num_virtual_tokens=5, init_std=1.0))
    service = PrefixService([Engine(model, tokenizer, "lm")], window=0.05)
    prompts = ["how many shapes", "what color is the small red circle on the left", "the", "a large blue square and"]
    names = ["a", None, "b", "a", "b", None]
    jobs = [Job("text", n, text=prompts[i % 4], generation=(("max_new_tokens", 9),)) for i, n in enumerate(names)]
    try:
        answers = [f.result(300) for f in waves(service, jobs, [2, 2, 2], service.batchers["lm"])]
    finally:
        service.close()
    for i, (name, answer) in enumerate(zip(names, answers)):
        assert answer == decode.complete_texts(model, tokenizer, [prompts[i % 4]], prefix=name, max_new_tokens=9)[0]
    assert answers[0] != decode.complete_texts(model, tokenizer, [prompts[0]], prefix=None, max_new_tokens=9)[0]


def test_gated_and_plain_prefixes_decode_in_separate_lanes_at_once():
    from mmprefix.embedded import text

    tokenizer = text.lm_tokenizer()
    model = add_prefix(tiny.world_llama(), PrefixConfig(num_virtual_tokens=3, init_std=1.0), name="plain")
    model.add_prefix("gated", PrefixConfig(num_virtual_tokens=3, init_std=1.0, gate="head"))
    with torch.no_grad():
        for gate in model.prefixes["gated"].gates.values():
            gate.fill_(1.0)
    service = PrefixService([Engine(model, tokenizer, "lm")], window=0.1)
    names = ["plain", "gated", None, "gated", "plain"]
    jobs = [Job("text", n, text="what color is the", generation=(("max_new_tokens", 6),)) for n in names]
    try:
        answers = [f.result(300) for f in [service.submit(job) for job in jobs]]
    finally:
        service.close()
    for name, answer in zip(names, answers):
        assert answer == decode.complete_texts(model, tokenizer, ["what color is the"], prefix=name, max_new_tokens=6)[0]
    assert answers[1] != answers[2] != answers[0]


# -- sampling ------------------------------------------------------------------------------------------------------
def test_a_seed_gives_the_same_sample_alone_and_among_any_companions():
    from mmprefix.embedded import text

    tokenizer = text.lm_tokenizer()
    model = add_prefix(tiny.world_llama(), PrefixConfig(num_virtual_tokens=3, init_std=1.0), name="a")
    engine = Engine(model, tokenizer, "lm")
    service = PrefixService([engine], window=0.1)

    def job(seed, prefix="a", temperature=1.5, top_p=0.9):
        settings = engine.settings(max_new_tokens=12, temperature=temperature, top_p=top_p, seed=seed)
        return Job("text", prefix, text="what color is the", generation=settings)

    try:
        alone = service.submit(job(7)).result(300)
        companions = [job(seed, prefix) for seed, prefix in ((1, None), (2, "a"), (3, "a"))] + [job(None, None, 0)]
        together = [f.result(300) for f in [service.submit(j) for j in [companions[0], job(7), *companions[1:]]]]
        others = {service.submit(job(seed)).result(300) for seed in range(8, 14)}
    finally:
        service.close()
    assert together[1] == alone and str(alone) != ""
    assert len(others) > 2, "different seeds draw different samples"
    greedy = decode.complete_texts(model, tokenizer, ["what color is the"], prefix=None, max_new_tokens=12)[0]
    assert together[-1] == greedy, "temperature 0 is greedy"


# -- stop sequences, end of text, usage ------------------------------------------------------------------------------
def test_stop_sequences_end_rows_at_any_step_even_the_first_and_the_others_go_on(blip_folder):
    service = PrefixService(serve_tiny.blip_engines(), blip_folder, window=0.1)
    engine = service.engines["blip-caption"]
    tokens = decode.caption_tokens(serve_tiny.reference("caption", None, blip_folder), tiny.world_blip_processor(),
                                   [serve_tiny.image(2)], max_new_tokens=14)[0].tolist()
    full, first = engine.decode_tokens(tokens), engine.decode_tokens(tokens[:1])
    middle = " " + full.split()[2]
    assert first and full.index(middle) > len(first), full
    try:
        cases = {"first": first, "middle": middle, "none": "@@"}
        jobs = {k: Job("caption", None, serve_tiny.image(2), generation=engine.settings(max_new_tokens=14, stop=[s]))
                for k, s in cases.items()}
        futures = {k: service.submit(j) for k, j in jobs.items()}
        answers = {k: f.result(300) for k, f in futures.items()}
    finally:
        service.close()
    assert answers["first"] == "" and answers["first"].finish_reason == "stop" and answers["first"].completion_tokens == 1
    assert answers["middle"] == full[: full.index(middle)] and answers["middle"].finish_reason == "stop"
    assert answers["none"] == full and answers["none"].completion_tokens == 14 and answers["none"].finish_reason == "length"


def test_a_row_that_ends_at_its_first_token_leaves_at_once_and_the_batch_goes_on(blip_folder):
    """The decoder's bias makes [SEP] win the first step for some images only (chosen from their first logits)."""
    engines = serve_tiny.blip_engines()
    caption = engines[1]
    head = caption.model.base_model
    sep = head.config.text_config.sep_token_id
    firsts = []
    for i in range(8):
        inputs = {"pixel_values": tiny.world_blip_processor()(images=[serve_tiny.image(i)], return_tensors="pt")["pixel_values"]}
        logits, _, _ = caption.stepper.prefill([inputs], [None])
        firsts.append(float(logits[0].max() - logits[0, sep]))
    threshold = sorted(firsts)[3] + 1e-3  # four images end at once, four go on
    with torch.no_grad():
        head.text_decoder.cls.predictions.bias[sep] += threshold
    service = PrefixService(engines, window=0.1)
    try:
        jobs = [Job("caption", None, serve_tiny.image(i), generation=(("max_new_tokens", 10),)) for i in range(8)]
        answers = [f.result(300) for f in [service.submit(job) for job in jobs]]
        alone = [decode.caption_images(caption.model, tiny.world_blip_processor(), [serve_tiny.image(i)],
                                       max_new_tokens=10)[0] for i in range(8)]
    finally:
        service.close()
    ended = [i for i, a in enumerate(answers) if a.completion_tokens == 1]
    assert len(ended) == 4 and all(answers[i] == "" and answers[i].finish_reason == "stop" for i in ended)
    assert answers == alone


# -- request-level batching, and what does not step -------------------------------------------------------
def test_request_level_batching_stays_available_and_gives_the_same_answers(blip_folder):
    answers = {}
    for batching in ("step", "request"):
        service = PrefixService(serve_tiny.blip_engines(), blip_folder, window=0.1, batching=batching)
        try:
            jobs = [Job("vqa", n, serve_tiny.image(i), QUESTIONS[1], generation=(("max_new_tokens", 8),))
                    for i, n in enumerate(["red", None, "blue"])]
            answers[batching] = [f.result(300) for f in [service.submit(j) for j in jobs]]
            assert service.batching_of()["blip-vqa"] == batching
        finally:
            service.close()
    assert answers["step"] == answers["request"]
    assert [a.completion_tokens for a in answers["step"]] == [a.completion_tokens for a in answers["request"]]
    service = PrefixService(serve_tiny.blip_engines(), batching="request")
    try:
        with pytest.raises(ValueError, match="sampling .* needs step-level batching"):
            service.submit(Job("vqa", None, serve_tiny.image(0), "what?", generation=(("temperature", 1.0), ("top_p", 1.0))))
    finally:
        service.close()


def test_request_level_batches_of_a_chat_vlm_pad_prompts_of_every_length_and_equal_each_alone(tmp_path):
    serve_tiny.save_llava_prefixes(tmp_path)
    service = PrefixService([serve_tiny.llava_engine()], tmp_path, window=0.2, batching="request")
    conversation = ({"role": "user", "content": [{"type": "text", "text": "what is there?"}, {"type": "image"}]},)
    jobs = [Job("chat", "la", generation=(("max_new_tokens", 6),), messages=conversation, images=(serve_tiny.image(1, 64),)),
            Job("vqa", "lb", serve_tiny.image(2, 64), QUESTIONS[2], generation=(("max_new_tokens", 6),)),
            Job("vqa", None, serve_tiny.image(3, 64), QUESTIONS[3], generation=(("max_new_tokens", 6),))]
    try:
        answers = [f.result(300) for f in [service.submit(job) for job in jobs]]
    finally:
        service.close()
    for job, answer in zip(jobs, answers):
        messages, images = (job.messages, job.images) if job.task == "chat" else (serve_tiny.one_turn(job.text), [job.image])
        alone, tokens, prompt = serve_tiny.llava_alone(tmp_path, job.prefix, messages, images, max_new_tokens=6)
        assert (answer, answer.completion_tokens, answer.prompt_tokens) == (alone, tokens, prompt), job.task


def test_soft_prompts_and_beam_search_run_as_request_level_batches_beside_the_steps():
    vqa, _ = serve_tiny.blip_heads()
    model = add_prefix(vqa, PrefixConfig(num_virtual_tokens=3, init_std=1.0, method="prompt"), name="soft")
    engine = Engine(model, tiny.world_blip_processor(), "blip-vqa")
    service = PrefixService([engine], window=0.1)
    try:
        jobs = [Job("vqa", "soft", serve_tiny.image(0), QUESTIONS[1]), Job("vqa", None, serve_tiny.image(1), QUESTIONS[1]),
                Job("vqa", None, serve_tiny.image(2), QUESTIONS[1], generation=(("num_beams", 3),))]
        assert [engine.steps(j) for j in jobs] == [False, False, False]  # not prepared yet
        answers = [f.result(300) for f in [service.submit(j) for j in jobs]]
        assert [engine.steps(j) for j in jobs] == [False, True, False]
    finally:
        service.close()
    with pytest.raises(ValueError, match="sampling .* needs step-level decoding, .*: its prefix is a soft prompt"):
        engine.group(Job("vqa", "soft", serve_tiny.image(0), QUESTIONS[1], generation=engine.settings(temperature=1.0)))
    processor = tiny.world_blip_processor()
    expected = [decode.answer_questions(model, processor, [serve_tiny.image(i)], [QUESTIONS[1]], prefix=p, **s)[0]
                for i, (p, s) in enumerate((("soft", {}), (None, {}), (None, {"num_beams": 3})))]
    assert answers == expected


def test_a_peft_prefix_that_shifts_positions_decodes_in_a_lane_of_its_own_beside_other_rows(tmp_path):
    from peft import PrefixTuningConfig, get_peft_model

    from mmprefix.embedded import text

    tokenizer = text.lm_tokenizer()
    peft_model = get_peft_model(tiny.world_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with torch.no_grad():
        for parameter in peft_model.prompt_encoder.parameters():
            parameter.normal_(std=0.5)
    peft_model.save_pretrained(tmp_path / "peft")
    model = add_prefix(tiny.world_llama(), PrefixConfig(num_virtual_tokens=3, init_std=1.0), name="own")
    model.load_prefix("peft", tmp_path / "peft")
    assert model.prefixes["peft"].config.position_offset
    service = PrefixService([Engine(model, tokenizer, "lm")], window=0.2)
    prompts = ["what color is the", "how many shapes are there on the left", "the"]
    names = ["peft", "own", None, "peft"]
    try:
        answers = [f.result(300) for f in [service.submit(Job("text", n, text=prompts[i % 3], generation=(("max_new_tokens", 8),)))
                                          for i, n in enumerate(names)]]
    finally:
        service.close()
    for i, (name, answer) in enumerate(zip(names, answers)):
        assert answer == decode.complete_texts(model, tokenizer, [prompts[i % 3]], prefix=name, max_new_tokens=8)[0], name
    assert answers[0] != decode.complete_texts(model, tokenizer, [prompts[0]], prefix=None, max_new_tokens=8)[0]
