"""Routing under concurrency: threads calling one PrefixModel with different routes each get what the same call
gives alone; a ``using`` block sees every edit of its prefixes; a routing list never silently broadcasts."""

import threading
import time

import pytest
import torch

import tiny
from mmprefix import PrefixConfig, add_prefix

# One route per thread: names, the base model, lists with one name per row (the batch has 2 rows), the active
# prefix, and scopes opened with using() instead of prefix=.
ROUTES = ["a", "b", None, ["a", "b"], ["b", None], [None, "a"], ("using", ["b", "a"]), ("using", None)]


def _two_prefixes(family, method="prefix"):
    """'a': 3 slots everywhere; 'b': 5 slots in the last layer of every tower (soft prompts: 3 and 5 vectors)."""
    if method == "prompt":
        pm = add_prefix(tiny.FAMILIES[family][0](), PrefixConfig(method="prompt", num_virtual_tokens=3, init_std=1.0), name="a")
        pm.add_prefix("b", PrefixConfig(method="prompt", num_virtual_tokens=5, init_std=1.0))
        return pm
    pm = add_prefix(tiny.FAMILIES[family][0](), PrefixConfig(num_virtual_tokens=3, init_std=1.0), name="a")
    pm.add_prefix("b", PrefixConfig(num_virtual_tokens=5, init_std=1.0, targets=["*[-1:]"]))
    return pm


def _call(pm, family, route, generating):
    """One call of ``pm`` on the family's two-row inputs, routed to ``route``."""
    if generating:
        inputs, extra = tiny.GENERATORS[family]
        run = lambda **kw: pm.generate(**inputs(), **extra, max_new_tokens=4, do_sample=False, **kw)  # noqa: E731
    else:
        run = lambda **kw: tiny.rows(family, pm(**tiny.FAMILIES[family][1](), **kw))  # noqa: E731
    with torch.no_grad():
        if isinstance(route, tuple):
            with pm.using(route[1]):
                return run()
        return run(prefix=route)


def hammer(family, generating, seconds, threads=8, method="prefix"):
    """``threads`` threads call one model with the routes of ``ROUTES`` for ``seconds``; returns the number of calls
    and the wrong results (each compared with the same call made alone, before any thread started)."""
    pm = _two_prefixes(family, method)
    routes = ROUTES[:threads]
    alone = [_call(pm, family, route, generating) for route in routes]
    assert len({str(x.tolist()) for x in alone}) > 3, "routes must give different results, or the test proves nothing"
    wrong, calls, start = [], [0] * threads, threading.Barrier(threads)
    deadline = time.monotonic() + seconds

    def worker(index):
        start.wait()
        while time.monotonic() < deadline:
            try:
                out = _call(pm, family, routes[index], generating)
                same = out.shape == alone[index].shape and torch.allclose(out.float(), alone[index].float(), atol=1e-5)
            except Exception as err:  # a crash is a wrong output too
                same, out = False, repr(err)
            if not same:
                wrong.append((routes[index], out))
            calls[index] += 1

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return sum(calls), wrong


@pytest.mark.parametrize("family,generating,method", [("gpt2", False, "prefix"), ("blip2_opt", True, "prefix"),
                                                     ("llama", False, "prompt")],
                         ids=["gpt2-forward", "blip2-generate", "llama-soft-prompts"])
def test_threads_with_different_routes_each_get_what_they_get_alone(family, generating, method):
    calls, wrong = hammer(family, generating, seconds=1.0, method=method)
    assert calls >= 16, f"only {calls} calls ran"
    assert not wrong, f"{len(wrong)} of {calls} calls gave another route's output, e.g. {wrong[0]}"


@pytest.mark.slow
@pytest.mark.parametrize("family,generating,method", [("gpt2", False, "prefix"), ("blip2_opt", True, "prefix"),
                                                     ("clip", False, "prefix"), ("llama", True, "prompt")])
def test_threads_thirty_seconds(family, generating, method):
    calls, wrong = hammer(family, generating, seconds=30, method=method)
    print(f"{family} ({method}, {'generate' if generating else 'forward'}): {calls} calls by 8 threads, {len(wrong)} wrong")
    assert not wrong, f"{len(wrong)} of {calls} calls gave another route's output, e.g. {wrong[0]}"


@pytest.mark.parametrize("family", ["gpt2", "llama", "blip2_opt"])
@pytest.mark.parametrize("route", [["a", "b"], "a"], ids=["list", "name"])
def test_using_block_sees_an_optimizer_step_and_an_edit_made_inside_it(family, route):
    pm = _two_prefixes(family)
    inputs = tiny.FAMILIES[family][1]
    optimizer = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=1.0)
    with pm.using(route):
        with torch.no_grad():
            before = tiny.rows(family, pm(**inputs()))  # a call of the block without autograd, as in evaluation
        tiny.rows(family, pm(**inputs())).float().sum().backward()
        optimizer.step()
        with torch.no_grad():
            after_step = tiny.rows(family, pm(**inputs()))
            step_fresh = tiny.rows(family, pm(**inputs(), prefix=route))  # an explicit route builds from the values
            for parameter in pm.prefixes["a"].parameters():
                parameter.add_(0.5)
            after_edit = tiny.rows(family, pm(**inputs()))
    with torch.no_grad():
        fresh = tiny.rows(family, pm(**inputs(), prefix=route))  # built from the current values, outside the block
    assert not torch.allclose(before, step_fresh, atol=1e-2), "the step must change the output"
    torch.testing.assert_close(after_step, step_fresh, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(step_fresh, fresh, atol=1e-2), "the edit must change the output"
    torch.testing.assert_close(after_edit, fresh, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "blip2_opt"])
def test_using_a_list_that_does_not_match_the_batch_raises(family):
    pm = _two_prefixes(family)
    inputs = {k: torch.cat([v, v]) for k, v in tiny.FAMILIES[family][1]().items()}  # 4 rows
    with pm.using(["a", None]), pytest.raises(ValueError, match="2 prefixes does not fit a batch of 4 rows"):
        pm(**inputs)
    with pytest.raises(ValueError, match="routing list has 2 entries but the batch has \\[4\\] rows"):
        pm(**inputs, prefix=["a", None])
