"""The serving library without HTTP: the batcher's windows, groups, failures and barriers; engines whose batched,
routed answers equal each request run alone on a model carrying only its prefix, in both batching modes;
prefixes added and removed while requests are in flight. (Step-level batching in depth: test_continuous.py.)"""

import threading
import time
from concurrent.futures import CancelledError

import pytest
import torch
import transformers as tf

import serve_tiny
import tiny
from mmprefix import PrefixConfig, PrefixModel, add_prefix
from mmprefix.evaluation import decode
from mmprefix.evaluation.contrastive import _ClipEncoder, class_embeddings
from mmprefix.serving import Batcher, Closed, Engine, Job, PrefixService, UnknownPrefix


# -- the batcher alone ----------------------------------------------------------------------------------------
class Recorder:
    """A batch function that records its batches; items named 'boom' make their batch raise."""

    def __init__(self, seconds=0.0):
        self.batches, self.seconds = [], seconds

    def __call__(self, items):
        self.batches.append(list(items))
        time.sleep(self.seconds)
        if any(item[1] == "boom" for item in items):
            raise RuntimeError("boom")
        return [f"done {item[1]}" for item in items]


def submit_together(batcher, items):
    """Submit from one thread per item, all released at once."""
    futures, start = [None] * len(items), threading.Barrier(len(items))

    def one(i):
        start.wait()
        futures[i] = batcher.submit(items[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(items))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return futures


def test_requests_within_the_window_share_a_batch_up_to_the_maximum():
    run = Recorder()
    batcher = Batcher(run, group=lambda item: item[0], max_batch_size=4, window=0.3)
    futures = submit_together(batcher, [("g", i) for i in range(10)])
    assert [f.result(5) for f in futures] == [f"done {i}" for i in range(10)]
    assert sorted(len(b) for b in run.batches) == [2, 4, 4]
    batcher.close()


def test_only_requests_of_one_group_share_a_batch():
    run = Recorder()
    batcher = Batcher(run, group=lambda item: item[0], max_batch_size=16, window=0.3)
    futures = submit_together(batcher, [("greedy" if i % 3 else "beam", i) for i in range(9)])
    [f.result(5) for f in futures]
    assert sorted(len(b) for b in run.batches) == [3, 6]
    assert all(len({item[0] for item in batch}) == 1 for batch in run.batches)
    batcher.close()


def test_a_failing_batch_fails_only_its_own_requests_and_the_worker_goes_on():
    run = Recorder()
    batcher = Batcher(run, group=lambda item: item[0], window=0.3)
    futures = submit_together(batcher, [("bad", "boom"), ("bad", 1), ("good", 2), ("good", 3)])
    for future in futures[:2]:
        with pytest.raises(RuntimeError, match="boom"):
            future.result(5)
    assert [f.result(5) for f in futures[2:]] == ["done 2", "done 3"]
    assert batcher.submit(("bad", 4)).result(5) == "done 4"
    batcher.close()


def test_a_request_cancelled_before_its_batch_starts_is_dropped():
    run = Recorder(seconds=0.3)
    batcher = Batcher(run, window=0)
    first = batcher.submit(("g", 0))
    time.sleep(0.1)  # the first batch is running
    left, stays = batcher.submit(("g", "left")), batcher.submit(("g", 2))
    assert left.cancel()
    assert stays.result(5) == "done 2" and first.result(5) == "done 0"
    assert all(item[1] != "left" for batch in run.batches for item in batch)
    with pytest.raises(CancelledError):
        left.result()
    batcher.close()


def test_a_barrier_runs_after_every_request_submitted_before_it():
    run = Recorder(seconds=0.05)
    batcher = Batcher(run, group=lambda item: item[0], max_batch_size=2, window=0.05)
    before = [batcher.submit(("g", i)) for i in range(5)]
    seen = batcher.barrier(lambda: [f.done() for f in before])
    after = batcher.submit(("g", 5))
    assert seen.result(5) == [True] * 5
    assert after.result(5) == "done 5"
    batcher.close()


def test_close_finishes_accepted_requests_and_refuses_new_ones():
    run = Recorder(seconds=0.2)
    batcher = Batcher(run, window=0.05)
    accepted = [batcher.submit(("g", i)) for i in range(3)]
    assert batcher.close(timeout=10)
    assert [f.result(0) for f in accepted] == ["done 0", "done 1", "done 2"]
    with pytest.raises(Closed):
        batcher.submit(("g", 3))


def test_a_request_submitted_while_the_worker_takes_a_batch_is_never_lost():
    """The submitter reads the waiting list, the worker takes a full batch and starts a new list, then the
    submitter appends: to the new list (mutation: `_enqueue` given the list itself -> 'late' is never run)."""
    run = Recorder()
    batcher = Batcher(run, max_batch_size=2, window=60)
    first = batcher.submit(("g", 0))
    held = serve_tiny.HeldBack(batcher, "late")
    late = []
    submitter = threading.Thread(target=lambda: late.append(batcher.submit(("g", "late"))), name="late")
    submitter.start()
    assert held.arrived.wait(10)
    second = batcher.submit(("g", 1))  # the group is full: the worker takes both and starts a new list
    assert [first.result(10), second.result(10)] == ["done 0", "done 1"]
    held.go.set()
    submitter.join(10)
    assert batcher.close(timeout=10)
    assert late[0].done() and late[0].result(0) == "done late"


# -- engines and the service ----------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["step", "request"])
def served(tmp_path_factory, request):
    folder = tmp_path_factory.mktemp("prefixes")
    serve_tiny.save_prefixes(folder)
    service = PrefixService(serve_tiny.blip_engines(), folder, max_batch_size=16, window=0.3, batching=request.param)
    yield service, folder
    service.close()


def test_mixed_prefix_requests_batch_together_and_each_equals_its_prefix_alone(served):
    service, folder = served
    processor = tiny.world_blip_processor()
    requests = [("vqa", name, i) for i, name in enumerate(["red", None, "green", "blue", "red", None, "blue", "green"])]
    requests += [("caption", name, i) for i, name in enumerate(["cap", None, "cap", None])]
    batched = lambda: sum(_sample(service, "sum", n) for n in service.engines)  # noqa: E731
    before, batches_before = batched(), {n: _sample(service, "count", n) for n in service.engines}
    jobs = [Job(task, name, serve_tiny.image(i), serve_tiny.QUESTIONS[0] if task == "vqa" else None,
                generation=(("max_new_tokens", 6),)) for task, name, i in requests]
    futures = submit_together(service, jobs)
    answers = [f.result(60) for f in futures]
    for (task, name, i), answer in zip(requests, answers):
        model = serve_tiny.reference(task, name, folder)
        if task == "vqa":
            expected = decode.answer_questions(model, processor, [serve_tiny.image(i)], [serve_tiny.QUESTIONS[0]],
                                               max_new_tokens=6)
        else:
            expected = decode.caption_images(model, processor, [serve_tiny.image(i)], max_new_tokens=6)
        assert answer == expected[0], (task, name, i)
    assert len({a for a in answers[:8]}) > 2, "prefixes must change the answers, or the test proves nothing"
    batches = {n: _sample(service, "count", n) - batches_before[n] for n in service.engines}
    if service.batching == "request":
        assert batched() - before == len(jobs)  # every request went through a batch
        assert batches["blip-vqa"] < 8 and batches["blip-caption"] < 4, f"mixed prefixes must share batches: {batches}"
    else:  # a step of each request's tokens: rows of different prefixes share steps
        tokens = sum(a.completion_tokens for a in answers) - len(jobs)  # the first token of each comes from its prefill
        assert batched() - before == tokens and batches["blip-vqa"] + batches["blip-caption"] < tokens / 2


def _sample(service, kind, model, **labels):
    value = service.metrics.registry.get_sample_value(f"mmprefix_batch_size_{kind}", {"model": model, **labels})
    return value or 0.0


def test_questions_of_different_lengths_never_share_a_request_level_blip_batch(served):
    """transformers' BLIP decoder sees the question's padding, so request-level batches group VQA by question
    length (step-level batching masks each row's question instead)."""
    service, _ = served
    engine = service.engines["blip-vqa"]
    short, long = (Job("vqa", None, serve_tiny.image(0), q) for q in ("what is red?", "what color is the circle?"))
    assert engine.group(short) != engine.group(long)
    assert engine.group(short) == engine.group(Job("vqa", "red", serve_tiny.image(1), "what is blue?"))


def test_streamed_pieces_join_into_the_answer(served):
    service, _ = served
    pieces = {i: [] for i in range(3)}
    jobs = [Job("caption", name, serve_tiny.image(i), generation=(("max_new_tokens", 10),), on_text=pieces[i].append)
            for i, name in enumerate(["cap", None, "cap"])]
    answers = [f.result(60) for f in submit_together(service, jobs)]
    for i, answer in enumerate(answers):
        assert "".join(pieces[i]) == answer
        assert len(pieces[i]) >= len(answer.split()), "greedy answers stream token by token"
    assert max(len(p) for p in pieces.values()) >= 3


def test_a_failing_stream_listener_fails_neither_its_request_nor_the_batch(served):
    service, _ = served

    def broken(piece):
        raise OSError("client socket closed")

    jobs = [Job("caption", None, serve_tiny.image(i), generation=(("max_new_tokens", 8),), on_text=listener)
            for i, listener in enumerate([broken, None])]
    answers = [f.result(60) for f in submit_together(service, jobs)]
    assert answers == [serve_tiny.expected_answer(service.prefix_dir, None, i, question=None, max_new_tokens=8)
                       for i in range(2)]


def test_unknown_prefix_and_wrong_task_are_refused_at_submission(served):
    service, _ = served
    with pytest.raises(ValueError, match="a 'vqa' job needs image and text; it has no image"):
        service.submit(Job("vqa", None, None, "what?"))
    with pytest.raises(ValueError, match="a 'caption' job needs image; it has no image"):
        service.submit(Job("caption", "cap"))
    with pytest.raises(UnknownPrefix, match=r"no prefix 'nope' for vqa; prefixes for vqa: \['blue', 'green', 'red'\]"):
        service.submit(Job("vqa", "nope", serve_tiny.image(0), "what?"))
    with pytest.raises(UnknownPrefix, match="no prefix 'cap' for vqa"):  # a captioning prefix
        service.submit(Job("vqa", "cap", serve_tiny.image(0), "what?"))
    with pytest.raises(ValueError, match="no served model does 'text'"):
        service.submit(Job("text", None, text="hello"))
    with pytest.raises(ValueError, match="invalid prefix name '../red'"):
        service.submit(Job("vqa", "../red", serve_tiny.image(0), "what?"))


class FailingEngine(Engine):
    """Fails every batch that holds the question 'boom?', as a kernel error would."""

    def run(self, jobs):
        if any(job.text == "boom?" for job in jobs):
            raise RuntimeError("kernel failure")
        return super().run(jobs)


def test_an_exception_inside_one_request_level_batch_fails_only_that_batch():
    vqa, _ = serve_tiny.blip_heads()
    service = PrefixService([FailingEngine(PrefixModel(vqa), tiny.world_blip_processor(), "blip-vqa")], window=0.3,
                            batching="request")
    try:
        bad = [Job("vqa", None, serve_tiny.image(0), "boom?"), Job("vqa", None, serve_tiny.image(1), "what?")]
        good = [Job("vqa", None, serve_tiny.image(0), "what is red?")]  # another length: another batch
        futures = submit_together(service, bad + good)
        for future in futures[:2]:
            with pytest.raises(RuntimeError, match="kernel failure"):
                future.result(60)
        assert isinstance(futures[2].result(60), str)
        assert isinstance(service.submit(bad[1]).result(60), str), "the worker serves on"
    finally:
        service.close()


def test_removing_a_prefix_lets_accepted_requests_finish_and_refuses_new_ones(tmp_path):
    serve_tiny.save_prefixes(tmp_path)
    service = PrefixService(serve_tiny.blip_engines(), tmp_path, window=0.5)
    try:
        accepted = [service.submit(Job("vqa", "red", serve_tiny.image(i), "what is red?")) for i in range(3)]
        remover = threading.Thread(target=service.remove, args=("red",))
        remover.start()
        time.sleep(0.1)
        with pytest.raises(UnknownPrefix, match="no prefix 'red'"):  # refused at once, before it leaves the model
            service.submit(Job("vqa", "red", serve_tiny.image(0), "what is red?"))
        remover.join(30)
        assert all(isinstance(f.result(30), str) for f in accepted)
        assert "red" not in service.engines["blip-vqa"].model.prefixes
        assert "red" not in service.models() and "blue" in service.models()
        assert service.add("red", tmp_path / "red") == ["blip-vqa"]
        assert isinstance(service.submit(Job("vqa", "red", serve_tiny.image(0), "what is red?")).result(30), str)
    finally:
        service.close()


def test_rescan_adds_new_folders_reloads_changed_ones_removes_missing_ones_and_skips_corrupt_ones(tmp_path):
    serve_tiny.save_prefixes(tmp_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "prefix_config.json").write_text("{not json")
    (tmp_path / "broken" / "prefix.safetensors").write_bytes(b"")
    (tmp_path / "has.dot").mkdir()
    service = PrefixService(serve_tiny.blip_engines(), tmp_path)
    try:
        assert sorted(service.models()) == ["base", "blue", "cap", "green", "red"]
        assert "not a readable safetensors file" in service.problems["broken"] and "invalid prefix name" in service.problems["has.dot"]
        image, question = serve_tiny.image(0), serve_tiny.QUESTIONS[0]
        old = service.submit(Job("vqa", "red", image, question)).result(30)
        import shutil

        shutil.rmtree(tmp_path / "green")
        vqa, _ = serve_tiny.blip_heads()
        torch.manual_seed(9)  # a retrained 'red', saved over the old one
        add_prefix(vqa, PrefixConfig(num_virtual_tokens=6, init_std=1.0), name="x").save_prefix(tmp_path / "red")
        (tmp_path / "recipe_out" / "prefix" / "prefix").mkdir(parents=True)  # a recipe's task folder
        add_prefix(serve_tiny.blip_heads()[0], PrefixConfig(num_virtual_tokens=2, init_std=1.0)).save_prefix(
            tmp_path / "recipe_out" / "prefix" / "prefix")
        report = service.rescan()
        assert report["added"] == ["recipe_out"] and report["reloaded"] == ["red"] and report["removed"] == ["green"]
        new = service.submit(Job("vqa", "red", image, question)).result(30)
        expected = decode.answer_questions(serve_tiny.reference("vqa", "red", tmp_path), tiny.world_blip_processor(),
                                           [image], [question])[0]
        assert new == expected != old
    finally:
        service.close()


def test_prefixes_already_on_a_model_are_served_and_rescans_leave_them(tmp_path):
    vqa, _ = serve_tiny.blip_heads()
    model = add_prefix(vqa, PrefixConfig(num_virtual_tokens=3, init_std=1.0), name="own")
    service = PrefixService([Engine(model, tiny.world_blip_processor(), "blip-vqa")], tmp_path)
    try:
        assert service.models() == {"base": ["vqa"], "own": ["vqa"]}
        image, question = serve_tiny.image(0), serve_tiny.QUESTIONS[0]
        answer = service.submit(Job("vqa", "own", image, question)).result(30)
        assert answer == decode.answer_questions(model, tiny.world_blip_processor(), [image], [question], prefix="own")[0]
        assert service.rescan()["removed"] == [] and "own" in service.models()
    finally:
        service.close()


def test_shared_heads_hold_one_copy_of_the_weights_and_answer_as_unshared_ones():
    vqa, caption = serve_tiny.blip_heads()
    assert caption.vision_model.embeddings.patch_embedding.weight.data_ptr() == \
        vqa.vision_model.embeddings.patch_embedding.weight.data_ptr()
    alone = tiny.world_blip(tf.BlipForConditionalGeneration)
    alone.load_state_dict(vqa.state_dict(), strict=False)
    processor = tiny.world_blip_processor()
    images = [serve_tiny.image(i) for i in range(2)]
    assert decode.caption_images(caption, processor, images) == decode.caption_images(alone, processor, images)


# -- text and CLIP engines -------------------------------------------------------------------------------------
def test_text_engine_continues_prompts_with_each_rows_prefix():
    from mmprefix.embedded import text

    tokenizer = text.lm_tokenizer()
    model = add_prefix(tiny.world_llama(), PrefixConfig(num_virtual_tokens=3, init_std=1.0), name="a")
    engine = Engine(model, tokenizer, "lm")
    prompts = ["how many shapes", "what color is", "the red circle is"]
    names = ["a", None, "a"]
    jobs = [Job("text", name, text=p, generation=(("max_new_tokens", 5),)) for p, name in zip(prompts, names)]
    answers = engine.run(jobs)
    for prompt, name, answer in zip(prompts, names, answers):
        assert answer == decode.complete_texts(model, tokenizer, [prompt], prefix=name, max_new_tokens=5)[0]
    assert answers[0] != decode.complete_texts(model, tokenizer, [prompts[0]], prefix=None, max_new_tokens=5)[0]


def test_clip_engine_features_and_zero_shot_classes_equal_the_prefix_alone():
    processor = tiny.world_clip_processor()
    model = add_prefix(tiny.clip(), PrefixConfig(num_virtual_tokens=3, init_std=1.0), name="a")
    engine = Engine(model, processor, "clip")
    classes, templates = ("red circle", "blue square", "shape"), ("a photo of a {}.", "the {}")
    images = [serve_tiny.image(i) for i in range(3)]
    names = ["a", None, "a"]
    features = engine.run([Job("image_features", n, image) for n, image in zip(names, images)])
    texts = engine.run([Job("text_features", n, text=t) for n, t in zip(names, ["a red circle", "the shape", "blue"])])
    classified = engine.run([Job("classify", n, image, classnames=classes, templates=templates)
                             for n, image in zip(names, images)])
    for row, name in enumerate(names):
        single = PrefixModel(tiny.clip())  # the same weights, with only this row's prefix
        if name is not None:
            single.add_prefix(name, PrefixConfig(num_virtual_tokens=3))
            single.prefixes[name].load_tensors(model.prefixes[name].tensors())
        encoder = _ClipEncoder(single, processor)
        image = encoder.images([images[row]])[0]
        torch.testing.assert_close(torch.tensor(features[row]), image, rtol=1e-5, atol=1e-5)
        text = encoder.texts([["a red circle", "the shape", "blue"][row]])[0]
        torch.testing.assert_close(torch.tensor(texts[row]), text, rtol=1e-5, atol=1e-5)
        prompts = [t.format(c) for c in classes for t in templates]
        class_text = torch.cat([encoder.texts([p]) for p in prompts])
        scores = (tiny.clip().logit_scale.exp() * image @ class_embeddings(class_text, len(templates)).T).softmax(-1)
        torch.testing.assert_close(torch.tensor(list(classified[row]["scores"].values())), scores, rtol=1e-4, atol=1e-5)
        assert classified[row]["label"] == classes[int(scores.argmax())]
    assert not torch.allclose(torch.tensor(features[0]), _ClipEncoder(PrefixModel(tiny.clip()), processor).images(
        [images[0]])[0], atol=1e-3), "the prefix must change the features"


def test_engine_refuses_settings_beyond_its_limits_and_unknown_ones():
    engine = serve_tiny.blip_engines(max_new_tokens=8, max_beams=2)[0]
    assert engine.settings(max_new_tokens=4, num_beams=None) == (("max_new_tokens", 4),)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer from 1 to 8, got 9"):
        engine.settings(max_new_tokens=9)
    with pytest.raises(ValueError, match="num_beams must be an integer from 1 to 2"):
        engine.settings(num_beams=0)
    with pytest.raises(ValueError, match="unknown generation setting 'do_sample'"):
        engine.settings(do_sample=True)
