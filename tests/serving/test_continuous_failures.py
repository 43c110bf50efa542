"""Step-level batching when things go wrong, without HTTP: prefixes removed or replaced while their rows decode, a
row that raises (at its prefill or mid-decode), a client that leaves, a prompt over the context, a bug in the
serving loop. Every other row's answer stays the answer it gets alone."""

import threading
import time

import pytest
import torch

import serve_tiny
import tiny
from mmprefix import PrefixConfig, PrefixModel, add_prefix
from mmprefix.evaluation import decode
from mmprefix.serving import ClientGone, Engine, Job, PrefixService, UnknownPrefix
from mmprefix.serving.inputs import ContextTooLong

QUESTIONS = serve_tiny.MIXED_QUESTIONS


def test_a_prefix_removed_while_its_rows_decode_is_finished_with_and_new_requests_are_refused(tmp_path):
    """'only' is the sole prefix on the model: removing it would take its attention sites back, but the rows
    hold its store, so its sites stay until they have finished."""
    vqa, _ = serve_tiny.blip_heads()
    torch.manual_seed(5)
    add_prefix(vqa, PrefixConfig(num_virtual_tokens=4, init_std=1.0)).save_prefix(tmp_path / "only")
    engine = Engine(PrefixModel(serve_tiny.blip_heads()[0]), tiny.world_blip_processor(), "blip-vqa")
    service = PrefixService([engine], tmp_path, window=0.05)
    gate = serve_tiny.StepGate(engine, at=2)
    reached, release = gate.reached, gate.release
    try:
        jobs = [Job("vqa", "only", serve_tiny.image(i), QUESTIONS[i], generation=(("max_new_tokens", 12),)) for i in range(3)]
        futures = [service.submit(job) for job in jobs]
        assert reached.wait(300)
        remover = threading.Thread(target=service.remove, args=("only",))
        remover.start()
        deadline = time.monotonic() + 10
        while "only" in service.models() and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(UnknownPrefix, match="no prefix 'only'"):
            service.submit(Job("vqa", "only", serve_tiny.image(0), QUESTIONS[0]))
        release.set()
        remover.join(30)
        answers = [f.result(300) for f in futures]
        assert "only" not in engine.model.prefixes and engine.model.sites, "the prefix left, its held sites stay"
        service.submit(Job("vqa", None, serve_tiny.image(0), QUESTIONS[0])).result(300)
        assert not engine.model.sites, "once its rows are done, its sites are given back"
    finally:
        release.set()
        service.close()
    for i, answer in enumerate(answers):
        assert answer == serve_tiny.expected_answer(tmp_path, "only", i, QUESTIONS[i], max_new_tokens=12), i
        assert answer != serve_tiny.expected_answer(tmp_path, None, i, QUESTIONS[i], max_new_tokens=12), i


def test_a_prefix_replaced_while_its_rows_decode_serves_the_old_to_them_and_the_new_to_later_requests(tmp_path):
    serve_tiny.save_prefixes(tmp_path)
    service = PrefixService(serve_tiny.blip_engines(), tmp_path, window=0.05)
    engine = service.engines["blip-vqa"]
    gate = serve_tiny.StepGate(engine, at=2)
    reached, release = gate.reached, gate.release
    old = tmp_path / "old-red"
    import shutil

    shutil.copytree(tmp_path / "red", old)
    try:
        first = [service.submit(Job("vqa", "red", serve_tiny.image(i), QUESTIONS[1], generation=(("max_new_tokens", 10),)))
                 for i in range(2)]
        assert reached.wait(300)
        torch.manual_seed(9)
        add_prefix(serve_tiny.blip_heads()[0], PrefixConfig(num_virtual_tokens=6, init_std=1.0)).save_prefix(tmp_path / "new")
        adder = threading.Thread(target=service.add, args=("red", tmp_path / "new"))
        adder.start()
        time.sleep(0.2)  # the replacement waits for the next step
        release.set()
        adder.join(30)
        later = [service.submit(Job("vqa", "red", serve_tiny.image(i), QUESTIONS[1], generation=(("max_new_tokens", 10),)))
                 for i in range(2)]
        answers, after = [f.result(300) for f in first], [f.result(300) for f in later]
    finally:
        release.set()
        service.close()
    for i in range(2):
        assert answers[i] == serve_tiny.expected_answer(old.parent, "old-red", i, QUESTIONS[1], max_new_tokens=10)
        assert after[i] == serve_tiny.expected_answer(tmp_path, "new", i, QUESTIONS[1], max_new_tokens=10)
    assert answers != after


def test_a_row_that_raises_fails_alone_and_the_rows_beside_it_finish_unchanged(blip_folder, tmp_path):
    engines = serve_tiny.blip_engines()
    model = engines[0].model
    model.load_prefix("red", blip_folder / "red")
    model.load_prefix("broken", blip_folder / "green")
    site = next(iter(model.prefixes["broken"].keys))
    model.prefixes["broken"].keys[site] = torch.nn.Parameter(torch.zeros(1, 3, 5))  # no longer fits its site
    service = PrefixService(engines, window=0.2)
    try:
        names = ["red", "broken", None, "red"]
        futures = [service.submit(Job("vqa", n, serve_tiny.image(i), QUESTIONS[0], generation=(("max_new_tokens", 8),)))
                   for i, n in enumerate(names)]
        with pytest.raises(RuntimeError, match="does not fit"):
            futures[1].result(300)
        answers = [futures[i].result(300) for i in (0, 2, 3)]
    finally:
        service.close()
    for i, answer in zip((0, 2, 3), answers):
        assert answer == serve_tiny.expected_answer(blip_folder, names[i], i, QUESTIONS[0], max_new_tokens=8), i


def test_a_row_that_raises_mid_decode_fails_alone_and_the_rows_beside_it_finish_unchanged(blip_folder):
    """The prefix of one row breaks after its prefill (its decoder's keys no longer fit): the step of the whole
    batch raises, each row is then stepped alone, and only the broken one fails."""
    engines = serve_tiny.endless_caption_engines()
    caption = engines[1]
    caption.model.load_prefix("breaks", blip_folder / "cap")
    service = PrefixService(engines, blip_folder, window=0.2)
    gate = serve_tiny.StepGate(caption, at=2)
    try:
        names = ["cap", "breaks", None]
        futures = [service.submit(Job("caption", n, serve_tiny.image(i), generation=(("max_new_tokens", 8),)))
                   for i, n in enumerate(names)]
        assert gate.reached.wait(300)
        store = caption.model.prefixes["breaks"]
        site = next(k for k in store.keys if "text_decoder" in k)
        store.keys[site] = torch.nn.Parameter(torch.zeros(1, 3, 5))  # the held store itself breaks
        gate.release.set()
        with pytest.raises(RuntimeError, match="does not fit"):
            futures[1].result(300)
        answers = [futures[i].result(300) for i in (0, 2)]
    finally:
        gate.release.set()
        service.close()
    for i, answer in zip((0, 2), answers):
        expected = decode.caption_images(caption.model, tiny.world_blip_processor(), [serve_tiny.image(i)],
                                         max_new_tokens=8, prefix=names[i])[0]
        assert answer == expected and answer.completion_tokens == 8, i


def test_a_cancelled_row_leaves_at_the_next_step_and_the_others_finish_unchanged(blip_folder):
    service = PrefixService(serve_tiny.blip_engines(), blip_folder, window=0.1)
    engine = service.engines["blip-caption"]
    spy = serve_tiny.StepGate(engine, at=3)
    reached, release = spy.reached, spy.release
    try:
        jobs = [Job("caption", n, serve_tiny.image(i), generation=(("max_new_tokens", 14),)) for i, n in enumerate(["cap", None, "cap"])]
        futures = [service.submit(job) for job in jobs]
        assert reached.wait(300)
        jobs[1].cancelled.set()  # what the server does when the client disconnects
        release.set()
        with pytest.raises(ClientGone):
            futures[1].result(300)
        answers = [futures[i].result(300) for i in (0, 2)]
        metrics = service.metrics.registry
        assert metrics.get_sample_value("mmprefix_requests_total", {"task": "caption", "outcome": "cancelled"}) == 1
    finally:
        release.set()
        service.close()
    rows_after = [rows for rows, _, _ in spy.steps[3:]]
    assert rows_after and max(rows_after) == 2, "the row left its batch"
    for i, answer in zip((0, 2), answers):
        assert answer == serve_tiny.expected_answer(blip_folder, "cap", i, question=None, max_new_tokens=14)


def test_a_prompt_over_the_context_is_refused_alone_and_the_batch_is_untouched():
    from mmprefix.embedded import text

    tokenizer = text.lm_tokenizer()
    model = add_prefix(tiny.world_llama(), PrefixConfig(num_virtual_tokens=3, init_std=1.0), name="a")
    engine = Engine(model, tokenizer, "lm")
    service = PrefixService([engine], window=0.1)
    try:
        running = service.submit(Job("text", "a", text="what color is the", generation=(("max_new_tokens", 8),)))
        long = " ".join(["red"] * 60)  # 61 tokens with <s>: 3 positions left of 64
        with pytest.raises(ContextTooLong, match="context is 64 positions; the prompt takes 61 and 8 new tokens"):
            service.submit(Job("text", "a", text=long, generation=(("max_new_tokens", 8),)))
        with pytest.raises(ContextTooLong, match="takes 70 of this model's 64 positions"):
            service.submit(Job("text", None, text=" ".join(["red"] * 69)))
        fits = service.submit(Job("text", None, text=long)).result(300)  # no number asked: what is left
        assert running.result(300) == decode.complete_texts(model, tokenizer, ["what color is the"], prefix="a",
                                                           max_new_tokens=8)[0]
    finally:
        service.close()
    assert fits.completion_tokens <= 3


def test_a_bug_in_the_serving_loop_fails_the_rows_it_held_and_the_loop_serves_on(blip_folder, monkeypatch):
    from mmprefix.serving import decoding

    service = PrefixService(serve_tiny.endless_caption_engines(), blip_folder, window=0.05)
    gate = serve_tiny.StepGate(service.engines["blip-caption"], at=2)

    def broken(parts):
        raise RuntimeError("a bug in merging caches")

    try:
        monkeypatch.setattr(decoding, "merge", broken)
        jobs = [Job("caption", n, serve_tiny.image(i), generation=(("max_new_tokens", 12),)) for i, n in enumerate(["cap", None])]
        futures = [service.submit(jobs[0])]
        assert gate.reached.wait(300)
        futures.append(service.submit(jobs[1]))  # joins the running row: the caches merge
        gate.release.set()
        for future in futures:
            with pytest.raises(RuntimeError, match="a bug in merging caches"):
                future.result(300)
        monkeypatch.undo()
        after = service.submit(Job("caption", "cap", serve_tiny.image(0), generation=(("max_new_tokens", 6),))).result(300)
    finally:
        gate.release.set()
        service.close()
    expected = decode.caption_images(service.engines["blip-caption"].model, tiny.world_blip_processor(),
                                     [serve_tiny.image(0)], max_new_tokens=6, prefix="cap")[0]
    assert after == expected


def test_a_request_submitted_while_the_worker_takes_the_inbox_is_never_lost():
    """The submitter reads the inbox, the worker takes it (a new inbox) and answers what it held, then the
    submitter appends: to the new inbox (mutation: `_enqueue` given the list itself -> 'late' never runs)."""
    from mmprefix.serving.scheduler import Scheduler

    engine = serve_tiny.blip_engines()[0]
    scheduler = Scheduler(engine, window=0.01)
    held = serve_tiny.HeldBack(scheduler, "late")
    late = []
    job = Job("vqa", None, serve_tiny.image(1), QUESTIONS[1])
    submitter = threading.Thread(target=lambda: late.append(scheduler.submit(job)), name="late")
    try:
        submitter.start()
        assert held.arrived.wait(60)
        first = scheduler.submit(Job("vqa", None, serve_tiny.image(0), QUESTIONS[0]))
        first.result(300)
        held.go.set()
        submitter.join(60)
        assert scheduler.close(timeout=300)
    finally:
        held.go.set()
        scheduler.close(timeout=300)
    assert late[0].done() and late[0].result(0) == serve_tiny.expected_answer(None, None, 1, QUESTIONS[1])
