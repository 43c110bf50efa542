"""Property-based tests (Hypothesis) of what takes arbitrary input: the readers, the widened attention masks and
routed prefix shapes, target strings, settings overrides, and prefix folders with fuzzed metadata. Each property
is checked against an independent statement of what must hold; example counts are small so that the file runs
in seconds."""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import tiny
from mmprefix import PrefixConfig, add_prefix, load_prefix
from mmprefix.core import saving, typed
from mmprefix.core.architectures import Site
from mmprefix.core.targets import select_sites
from mmprefix.core.attention.mechanism import Prefix, widen_mask
from mmprefix.data.readers import AnnotationError, read_caption_jsonl, read_text_jsonl, read_vqa_jsonl
from mmprefix.experiment import settings as run_settings
from mmprefix.core.routing import Call, Routing

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])
ROOT = Path(__file__).resolve().parents[1]
counter = itertools.count()

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                  st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                           max_leaves=6)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("properties")


# -- readers ---------------------------------------------------------------------------------------------------

FIELDS = ["image", "question", "answers", "answer", "question_id", "id", "image_id", "caption", "captions", "prompt",
          "target", "question_type", "answer_type"]
records = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6)
lines = st.lists(st.one_of(records.map(json.dumps), st.text(max_size=20).filter(lambda t: "\n" not in t and "\r" not in t)),
                 max_size=5)


@FAST
@given(lines=lines, reader=st.sampled_from([read_vqa_jsonl, read_caption_jsonl, read_text_jsonl]))
def test_a_jsonl_reader_returns_typed_samples_or_an_annotation_error(lines, reader, scratch):
    path = scratch / f"fuzz-{next(counter)}.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    try:
        samples = reader(path)
    except AnnotationError as err:
        assert str(path) in str(err) and "\n" not in str(err)
        return
    assert len(samples) == sum(1 for line in lines if line.strip())
    for sample in samples:
        texts = {read_vqa_jsonl: ("question",), read_caption_jsonl: ("image",), read_text_jsonl: ("prompt", "target")}
        assert all(isinstance(getattr(sample, field), str) for field in texts[reader])
        for field in ("answers", "captions"):
            assert all(isinstance(item, str) for item in getattr(sample, field, []))
    ids = [getattr(s, {read_vqa_jsonl: "question_id", read_caption_jsonl: "image_id", read_text_jsonl: "id"}[reader])
           for s in samples]
    assert len(set(map(repr, ids))) == len(ids), "ids are unique"


# -- widened masks -----------------------------------------------------------------------------------------------


@st.composite
def mask_calls(draw):
    batch, heads, q_len = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 4))
    kv_len, slots = draw(st.integers(q_len, 6)), draw(st.integers(1, 4))
    kind = draw(st.sampled_from(["none", "bool", "float"]))
    rows = draw(st.sampled_from([1, batch]))
    allowed = torch.tensor(draw(st.lists(st.booleans(), min_size=rows * q_len * kv_len, max_size=rows * q_len * kv_len)))
    allowed = allowed.view(rows, 1, q_len, kv_len)
    mask = None if kind == "none" else allowed if kind == "bool" else torch.zeros(allowed.shape).masked_fill(
        ~allowed, torch.finfo(torch.float32).min)
    visible = draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=batch * slots, max_size=batch * slots)))
    visible = None if visible is None else torch.tensor(visible).view(batch, slots)
    return batch, heads, q_len, kv_len, slots, mask, visible, draw(st.booleans())


@FAST
@given(call=mask_calls(), cached=st.booleans())
def test_a_widened_mask_puts_one_column_per_prefix_slot_in_front(call, cached):
    batch, heads, q_len, kv_len, slots, mask, visible, causal = call
    query = torch.zeros(batch, heads, q_len, 8)
    prefix = Prefix(torch.zeros(batch, heads, slots, 8), torch.zeros(batch, heads, slots, 8), visible,
                    cache={} if cached else None)
    widened = widen_mask(mask, prefix, query, kv_len, causal)
    if mask is None and not causal and visible is None:
        assert widened is None
        return
    assert widened.shape[-1] == slots + kv_len and widened.shape[0] in (1, batch) and widened.shape[2] in (1, q_len)
    assert widened.dtype == (torch.bool if mask is not None and mask.dtype == torch.bool else torch.float32)
    attend = widened if widened.dtype == torch.bool else widened == 0  # the reference, stated independently:
    for row, query_position, column in itertools.product(range(batch), range(q_len), range(slots + kv_len)):
        r, q = (row if attend.shape[0] > 1 else 0), (query_position if attend.shape[2] > 1 else 0)  # broadcast
        if column < slots:  # a prefix slot: visible to the row or not, never causal
            expected = True if visible is None else bool(visible[row, column])
        else:
            key = column - slots
            if mask is not None:
                expected = bool((mask if mask.dtype == torch.bool else mask == 0)[row if mask.shape[0] > 1 else 0, 0,
                                                                                     query_position, key])
            else:  # no mask: SDPA's top-left causal alignment over the real keys
                expected = key <= query_position if causal else True
        assert bool(attend[r, 0, q, column]) == expected
    if cached:
        assert widen_mask(mask, prefix, query, kv_len, causal) is widened  # reused by the call's other layers


# -- routed prefix shapes ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def routed_model():
    model = add_prefix(tiny.gpt2(), PrefixConfig(num_virtual_tokens=2, init_std=1.0), name="a")
    model.add_prefix("b", PrefixConfig(num_virtual_tokens=5, init_std=1.0))
    model.add_prefix("c", PrefixConfig(num_virtual_tokens=3, init_std=1.0, targets=["lm.self[-1:]"]))
    return model


@FAST
@given(names=st.lists(st.sampled_from(["a", "b", "c", None]), min_size=1, max_size=5), repeat=st.integers(1, 3),
       site=st.sampled_from(["transformer.h.0.attn", "transformer.h.1.attn"]))
def test_a_routed_batch_gives_each_row_its_own_prefix(names, repeat, site, routed_model):
    stores = routed_model.prefixes
    routing = Routing(names, stores)
    with torch.no_grad():
        prefix = routing.prefix(site, len(names) * repeat, Call(expansion=repeat, cache={}))
    lengths = [stores[n].num_virtual_tokens if n is not None and stores[n].has_site(site) else 0 for n in names]
    if max(lengths) == 0:
        assert prefix is None
        return
    slots = max(lengths)
    assert prefix.keys.shape == (len(names) * repeat, 4, slots, 8) == prefix.values.shape
    for row in range(len(names) * repeat):
        name, length = names[row // repeat], lengths[row // repeat]
        seen = [True] * slots if prefix.visible is None else prefix.visible[row].tolist()
        assert seen == [slot < length for slot in range(slots)]
        if length:
            keys, values = stores[name].kv(site)
            torch.testing.assert_close(prefix.keys[row, :, :length], keys, rtol=0, atol=0)
            torch.testing.assert_close(prefix.values[row, :, :length], values, rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not fit a batch"):
        routing.prefix(site, len(names) * repeat + 1, Call(expansion=repeat, cache={}))


# -- target strings ----------------------------------------------------------------------------------------------

SITES = [Site(f"{tower}.{kind}.{layer}", tower, kind, layer, 4, 4, 8, "interface")
         for tower, kinds, layers in [("vision", ["self"], 3), ("text_decoder", ["self", "cross"], 2), ("lm", ["self"], 4)]
         for kind in kinds for layer in range(layers)]


@FAST
@given(target=st.one_of(st.from_regex(r"(vision|lm|text_decoder|[a-z*?]{1,5})(\.[a-z*?]{1,5})?(\[-?\d?:-?\d?\])?",
                                      fullmatch=True),
                        st.text(alphabet="visonlmtext_decr.*?[]:-0123456789 ", max_size=16)))
def test_any_target_string_selects_sites_or_says_why_not(target):
    try:
        chosen = select_sites(SITES, [target])
    except ValueError as err:
        assert "\n" not in str(err) and any(words in str(err) for words in
                                            ("cannot parse target", "matches no attention site", "selects no layer"))
        return
    assert chosen and all(site in SITES for site in chosen)


@FAST
@given(tower=st.sampled_from(["vision", "text_decoder", "lm", "*"]), kind=st.sampled_from([None, "self", "cross", "*"]),
       start=st.one_of(st.none(), st.integers(-5, 5)), stop=st.one_of(st.none(), st.integers(-5, 5)),
       sliced=st.booleans())
def test_a_well_formed_target_selects_those_layers_of_each_tower(tower, kind, start, stop, sliced):
    target = tower + (f".{kind}" if kind else "") + (f"[{'' if start is None else start}:{'' if stop is None else stop}]"
                                                    if sliced else "")
    matching = [s for s in SITES if (tower == "*" or s.tower == tower) and (kind in (None, "*") or s.kind == kind)]
    assume(matching)
    expected = []
    for name in dict.fromkeys(s.tower for s in matching):
        layers = sorted({s.layer for s in matching if s.tower == name})
        kept = layers[slice(start, stop)] if sliced else layers
        expected += [s for s in matching if s.tower == name and s.layer in kept]
    if not expected:
        with pytest.raises(ValueError, match="selects no layer"):
            select_sites(SITES, [target])
        return
    assert select_sites(SITES, [target]) == [s for s in SITES if s in expected]


# -- settings overrides --------------------------------------------------------------------------------------------

KEYS = ["train.learning_rate", "train.max_steps", "train.mixed_precision", "train.resume", "prefix.num_virtual_tokens",
        "prefix.targets", "prefix.init_text", "eval.generation.num_beams", "data.val.limit", "method", "model",
        "train.nope", "nope", "eval.batch_size.x", "train.trackers"]


@FAST
@given(key=st.sampled_from(KEYS), value=st.text(max_size=12).filter(lambda t: "\n" not in t and "\r" not in t))
def test_any_override_gives_typed_settings_or_one_line_naming_the_key(key, value):
    config = ROOT / "recipes" / "configs" / "vqa.yaml"
    try:
        run = run_settings.recipe_settings([f"{key}={value}"], "vqa", config)
    except run_settings.SettingsError as err:
        assert "\n" not in str(err)
        return
    section, _, field = key.partition(".")
    node = getattr(run, section) if field else run
    if field and "." not in field:
        wanted = typed.hints(type(node))[field]
        typed.check(getattr(node, field), wanted)  # the value has its field's type


@FAST
@given(rate=st.floats(min_value=1e-12, max_value=1e3, allow_nan=False), style=st.sampled_from(["{:e}", "{!r}", "{:.3g}"]))
def test_a_number_in_any_notation_is_a_number(rate, style):
    text = style.format(rate)
    run = run_settings.recipe_settings([f"train.learning_rate={text}"], "vqa", ROOT / "recipes" / "configs" / "vqa.yaml")
    assert isinstance(run.train.learning_rate, float) and math.isclose(run.train.learning_rate, float(text))


# -- prefix folders with fuzzed metadata -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    model = add_prefix(tiny.gpt2(), PrefixConfig(num_virtual_tokens=3, init_std=1.0, gate="head"))
    model.save_prefix(folder)
    meta = json.loads(saving.safetensors_header(folder / saving.WEIGHTS_NAME)[0][saving.METADATA_KEY])
    return folder, meta, load_file(folder / saving.WEIGHTS_NAME)


def paths_of(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from paths_of(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from paths_of(value, (*prefix, index))


@FAST
@given(data=st.data())
def test_a_prefix_folder_with_fuzzed_metadata_loads_exactly_or_is_refused(data, saved, scratch):
    folder, meta, tensors = saved
    fuzzed = json.loads(json.dumps(meta))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from([p for p in paths_of(fuzzed) if p]))
        *parents, last = path
        node = fuzzed
        for part in parents:
            node = node[part]
        if isinstance(node, dict) and data.draw(st.booleans()):
            del node[last]
        else:
            node[last] = data.draw(json_values)
    target = scratch / f"prefix-{next(counter)}"
    target.mkdir()
    save_file(tensors, target / saving.WEIGHTS_NAME, metadata={"format": "mmprefix",
                                                               saving.METADATA_KEY: json.dumps(fuzzed)})
    try:
        loaded = load_prefix(tiny.gpt2(), target)
    except ValueError as err:
        assert "\n" not in str(err)
        return
    # Accepted: only fields that change nothing about the tensors (e.g. the model's name) may have been fuzzed.
    assert loaded.prefixes["default"].tensors().keys() == tensors.keys()
    for name, tensor in loaded.prefixes["default"].tensors().items():
        torch.testing.assert_close(tensor, tensors[name], rtol=0, atol=0)


def test_a_key_with_a_control_character_gives_a_one_line_error():
    """Found by the fuzz test above: a metadata key "\\n" put a line break into the error."""
    with pytest.raises(ValueError) as caught:
        PrefixConfig.from_dict({"\n": None}, "prefix.safetensors (metadata)", "prefix_config")
    assert "\n" not in str(caught.value) and "\\n is not a setting" in str(caught.value)
