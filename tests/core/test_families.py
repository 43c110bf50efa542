"""The family matrix: every class mmprefix names, on a tiny config with its real processor, through every check.

Sites (towers, kinds, layers), forward, ``disable_prefix()`` bit-equal to the untouched model, gradients only on
the prefix, per-row routing equal to each row alone, greedy and beam generation with and without the KV cache
against a full recompute of every step, save/load, ``init="text"`` through the processor, and a soft prompt equal
to the same vectors read as tokens. The factories are in ``tiny_families.py``.
"""

from __future__ import annotations

import functools

import pytest
import torch
import transformers
from packaging.version import Version

import tiny
import tiny_families
from mmprefix import PrefixConfig, PrefixModel, add_prefix, load_prefix
from mmprefix.core.architectures import prompt_input

CASES = tiny_families.CASES
# Families whose bare model fails on the installed transformers (CI also runs this file on the lowest supported one)
TOO_OLD = sorted(n for n, c in CASES.items() if c.since and Version(transformers.__version__) < Version(c.since))
NAMES = sorted(set(CASES) - set(TOO_OLD))
GENERATING = sorted(n for n in NAMES if CASES[n].generation)
BEAMS = sorted(n for n in GENERATING if CASES[n].beams)
PROMPTED = sorted(n for n in NAMES if CASES[n].prompt)
ROWS = sorted(n for n in NAMES if CASES[n].per_row)
NEW_TOKENS = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run several times faster on one thread than on two that wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def processor(name):
    return CASES[name].processor()


def inputs(name, labels=True) -> dict:
    """A fresh copy of the family's forward batch (the model may not keep references to it)."""
    batch = _inputs(name)
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items() if labels or k != "labels"}


@functools.lru_cache(maxsize=None)
def _inputs(name) -> dict:
    return CASES[name].inputs(processor(name))


def read(name, result) -> torch.Tensor:
    read_output = CASES[name].output
    return read_output(result) if callable(read_output) else getattr(result, read_output)


def output(name, model, **kwargs) -> torch.Tensor:
    return read(name, model(**inputs(name), **kwargs))


@functools.lru_cache(maxsize=None)
def untouched(name) -> torch.Tensor:
    """The model's output without mmprefix, its weights frozen as every wrapped model's are (PyTorch's
    nn.MultiheadAttention, SigLIP's pooling head, rounds its last bit differently for frozen weights)."""
    with torch.no_grad():
        return output(name, CASES[name].build().requires_grad_(False))


def prefixed(name, **config) -> PrefixModel:
    config = {"num_virtual_tokens": 3, "init_std": 1.0, "targets": CASES[name].targets, **config}
    return add_prefix(CASES[name].build(), PrefixConfig(**config))


@pytest.mark.parametrize("name", NAMES)
def test_sites_have_the_expected_towers_kinds_and_layers(name):
    pm = prefixed(name)
    counts = {}
    for site in pm.sites:
        counts[(site.tower, site.kind)] = counts.get((site.tower, site.kind), 0) + 1
    expected = {key: len(value) if isinstance(value, list) else value for key, value in CASES[name].sites.items()}
    assert counts == expected
    for (tower, kind), value in CASES[name].sites.items():  # a count: layers 0..n-1; a list: those layers
        layers = sorted(s.layer for s in pm.sites if (s.tower, s.kind) == (tower, kind))
        assert layers == (value if isinstance(value, list) else list(range(value))), f"{tower}.{kind} layers {layers}"


@pytest.mark.parametrize("name", NAMES)
def test_a_prefix_changes_the_output_and_disabled_or_empty_is_the_untouched_model(name):
    expected = untouched(name)
    pm = prefixed(name)
    with torch.no_grad():
        with pm.disable_prefix():
            torch.testing.assert_close(output(name, pm), expected, rtol=0, atol=0)
        changed = output(name, pm)
        empty = prefixed(name, num_virtual_tokens=0)
        torch.testing.assert_close(output(name, empty), expected, rtol=0, atol=0)
    assert not torch.allclose(changed, expected, atol=1e-4), "an active prefix must change the output"


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_prefix_tensor_and_nothing_else(name):
    pm = prefixed(name, init_std=0.5)
    output(name, pm).float().pow(2).mean().backward()
    prefix_parameters = dict(pm.prefixes.named_parameters())
    for key, parameter in prefix_parameters.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"no gradient for {key}"
    for key, parameter in pm.base_model.named_parameters():
        assert not parameter.requires_grad and parameter.grad is None, f"base parameter {key} got a gradient"


@pytest.mark.parametrize("name", ROWS)
@pytest.mark.parametrize("routing", [["a", "b"], ["b", None]], ids=["a-b", "b-none"])
def test_each_row_of_a_routed_batch_equals_that_row_alone(name, routing):
    if CASES[name].routable is not None:  # a tower no call can route per row: refused before any compute
        with pytest.raises(ValueError, match="per-row routing cannot (reach|tell which row each item of)"):
            prefixed(name)(**inputs(name), prefix=["default", None])
    pm = routed(name)
    with torch.no_grad():
        mixed = output(name, pm, prefix=routing)
        for row, prefix in enumerate(routing):
            alone = output(name, pm, prefix=prefix)
            torch.testing.assert_close(real(name, mixed, row), real(name, alone, row), rtol=1e-5, atol=1e-5,
                                       msg=f"row {row} ({prefix})")


def real(name, tensor: torch.Tensor, row: int) -> torch.Tensor:
    """One row of a per-token output without its padding positions (what a padding query attends to is
    meaningless: a model may mask all its keys)."""
    mask = _inputs(name).get("attention_mask")
    if mask is not None and tensor.dim() > 2 and tensor.shape[1] == mask.shape[1]:
        return tensor[row][mask[row].bool()]
    return tensor[row]


def routed(name) -> PrefixModel:
    """Prefixes "a" (3 slots, every site) and "b" (5 slots, last layer of every tower), where rows can be routed."""
    pm = prefixed(name)
    targets = CASES[name].routable or CASES[name].targets
    pm.delete_prefix("default")
    pm.add_prefix("a", PrefixConfig(num_virtual_tokens=3, init_std=1.0, targets=targets))
    pm.add_prefix("b", PrefixConfig(num_virtual_tokens=5, init_std=1.0, targets=[f"{t}[-1:]" for t in (targets or ["*"])]))
    return pm


# -- generation ------------------------------------------------------------------------------------------------
def _grow(name, batch: dict, token: torch.Tensor) -> dict:
    """The inputs of the next full-recompute step: ``token`` appended, aligned inputs extended."""
    case = CASES[name]
    key = "decoder_input_ids" if case.generation == "seq2seq" else "input_ids"
    grown = dict(batch)
    grown[key] = torch.cat([batch[key], token], dim=1)
    if case.generation == "decoder":
        grown["attention_mask"] = mask = torch.cat([batch["attention_mask"], torch.ones_like(token)], dim=1)
        if "position_ids" in batch:
            grown["position_ids"] = positions(mask) + case.positions
        for aligned, fill in case.grow.items():
            last = batch[aligned][:, -1:]
            grown[aligned] = torch.cat([last if fill == "last" else torch.full_like(last, fill), ], dim=1)
            grown[aligned] = torch.cat([batch[aligned], grown[aligned]], dim=1)
    return grown


def positions(mask: torch.Tensor) -> torch.Tensor:
    """What generate() passes as position ids to a left-padded decoder (padding at 0)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _start(name, model, reference=False) -> dict:
    """The generation inputs; for the reference loop also the position ids that generate() would make."""
    batch = inputs(name, labels=False)
    if reference and CASES[name].generation == "decoder" and CASES[name].positions is not None:
        batch["position_ids"] = positions(batch["attention_mask"]) + CASES[name].positions
    if CASES[name].generation == "seq2seq":
        start = model.generation_config.decoder_start_token_id
        batch["decoder_input_ids"] = torch.full((batch_size(batch), 1), start)
    return batch


def batch_size(batch: dict) -> int:
    return next(v.shape[0] for k, v in batch.items() if k in ("input_ids", "pixel_values", "input_features"))


@functools.lru_cache(maxsize=None)
def suppressed(name) -> tuple[int, ...]:
    """Special tokens other than end of text: a random model may pick an image placeholder, which would turn
    the next step's input into a malformed image prompt. Both generate and the reference loop never pick them."""
    if CASES[name].suppress:
        return CASES[name].suppress
    tokenizer = getattr(processor(name), "tokenizer", processor(name))
    return tuple(sorted(set(tokenizer.added_tokens_decoder) - {tokenizer.eos_token_id}))


def _recompute_greedy(name, pm) -> torch.Tensor:
    """Greedy decoding by recomputing the full forward at every step (no cache anywhere)."""
    batch = _start(name, pm, reference=True)
    key = "decoder_input_ids" if CASES[name].generation == "seq2seq" else "input_ids"
    for _ in range(NEW_TOKENS):
        logits = pm(**batch, use_cache=False).logits[:, -1]
        logits[:, list(suppressed(name))] = float("-inf")
        batch = _grow(name, batch, logits.argmax(-1, keepdim=True))
    return batch[key]


def _new_tokens(name, sequences: torch.Tensor, start: dict) -> torch.Tensor:
    if CASES[name].generation == "seq2seq":
        return sequences[:, 1:]
    return sequences[:, start["input_ids"].shape[1]:]


def _until_eos(row: torch.Tensor, eos: set) -> list:
    out = []
    for token in row.tolist():
        out.append(token)
        if token in eos:
            break
    return out


def _eos(pm) -> set:
    eos = pm.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


@pytest.mark.parametrize("name", GENERATING)
def test_greedy_generation_with_and_without_cache_equals_a_full_recompute_loop(name):
    pm = prefixed(name)
    with torch.no_grad():
        reference = _new_tokens(name, _recompute_greedy(name, pm), _start(name, pm))
        for use_cache in (True, False):
            start = _start(name, pm)
            start.pop("decoder_input_ids", None)
            generated = pm.generate(**start, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=use_cache,
                                    suppress_tokens=suppressed(name), return_dict_in_generate=True)
            got = _new_tokens(name, generated.sequences, _start(name, pm))
            for row in range(got.shape[0]):
                expected = _until_eos(reference[row], _eos(pm))
                assert _until_eos(got[row], _eos(pm)) == expected, f"row {row}, use_cache={use_cache}"


def test_a_family_left_out_on_this_transformers_fails_without_mmprefix():
    """The matrix leaves a family out on a transformers older than its `since` only where the bare model itself fails
    there (Llama 4 on 5.24; on newer versions nothing is left out)."""
    for name in TOO_OLD:
        with pytest.raises(Exception):
            untouched(name)


@pytest.mark.parametrize("name", sorted(set(GENERATING) - set(BEAMS)))
def test_beam_search_fails_in_the_bare_model_where_the_matrix_leaves_it_out(name):
    """Fuyu's own generate(num_beams=3) fails without mmprefix ("Image features and image tokens do not match", in
    transformers 5.25): the beam checks leave it out until this test fails."""
    start = _start(name, CASES[name].build())
    start.pop("decoder_input_ids", None)
    with torch.no_grad(), pytest.raises(ValueError, match="do not match"):
        CASES[name].build().generate(**start, max_new_tokens=2, do_sample=False, num_beams=3)


@pytest.mark.parametrize("name", BEAMS)
def test_beam_search_scores_with_and_without_cache_equal_a_full_recompute(name):
    """Every step of every returned beam, scored by generate (cached or not), equals the log-probability that a
    full forward over the finished sequence gives that token."""
    pm = prefixed(name)
    for use_cache in (True, False):
        start = _start(name, pm)
        start.pop("decoder_input_ids", None)
        with torch.no_grad():
            out = pm.generate(**start, max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=3, use_cache=use_cache,
                              output_scores=True, return_dict_in_generate=True, suppress_tokens=suppressed(name))
            new = _new_tokens(name, out.sequences, _start(name, pm))
            if out.scores[0].shape[0] == out.sequences.shape[0]:  # already per returned sequence (Whisper)
                steps = torch.stack([s.gather(1, new[:, t : t + 1])[:, 0] for t, s in enumerate(out.scores)], 1)
            else:
                steps = pm.compute_transition_scores(out.sequences, out.scores, out.beam_indices, normalize_logits=False)
            full = _start(name, pm, reference=True)
            for column in range(new.shape[1] - 1):
                full = _grow(name, full, new[:, column : column + 1])
            log_probs = pm(**full, use_cache=False).logits.float().log_softmax(-1)
        offset = log_probs.shape[1] - new.shape[1]  # the logits that predict the first new token
        for row in range(new.shape[0]):
            length = len(_until_eos(new[row], _eos(pm)))
            recomputed = log_probs[row, offset + torch.arange(length), new[row, :length]]
            torch.testing.assert_close(steps[row, :length], recomputed, rtol=1e-4, atol=1e-4,
                                       msg=f"row {row}, use_cache={use_cache}")


@pytest.mark.parametrize("name", GENERATING)
def test_routed_generation_gives_each_row_what_it_gets_alone(name):
    """Greedy and beam search, with per-row prefixes kept through the beams (and the packed or tiled images)."""
    pm = routed(name)
    scored = dict(output_scores=True, return_dict_in_generate=True, max_new_tokens=NEW_TOKENS, do_sample=False,
                  suppress_tokens=suppressed(name))
    start = _start(name, pm)
    start.pop("decoder_input_ids", None)
    with torch.no_grad():
        for beams in (1, 3) if CASES[name].beams else (1,):
            mixed = pm.generate(**start, **scored, num_beams=beams, prefix=["b", "a"])
            for row, prefix in enumerate(["b", "a"]):
                alone = pm.generate(**start, **scored, num_beams=beams, prefix=prefix)
                got, expected = (_until_eos(out.sequences[row], _eos(pm)) for out in (mixed, alone))
                assert got == expected, f"row {row} ({prefix}), {beams} beams"
                per_row = mixed.scores[0].shape[0] // 2  # this row's beams (Whisper: its returned sequence)
                rows = slice(row * per_row, (row + 1) * per_row)
                torch.testing.assert_close(mixed.scores[0][rows], alone.scores[0][rows], rtol=1e-5, atol=1e-5)


# -- the decoupled prefix (method="memory") -----------------------------------------------------------------------
def memorised(name, **config) -> PrefixModel:
    """A memory prefix whose values are random (they start at zero)."""
    pm = prefixed(name, method="memory", **config)
    with torch.no_grad():
        for store in pm.prefixes.values():
            for value in store.values.values():
                value.normal_()
    return pm


@pytest.mark.parametrize("name", NAMES)
def test_an_empty_memory_is_the_untouched_model_and_a_filled_one_changes_it_and_saves(name, tmp_path):
    expected = untouched(name)
    with torch.no_grad():
        empty = prefixed(name, method="memory")
        torch.testing.assert_close(output(name, empty), expected, **tiny.no_op_tolerance(empty))
        pm = memorised(name)
        assert not torch.allclose(output(name, pm), expected, atol=1e-4), "a filled memory must change the output"
        pm.save_prefix(tmp_path)
        torch.testing.assert_close(output(name, load_prefix(CASES[name].build(), tmp_path)), output(name, pm),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("name", ["blip_caption", "git"])
def test_a_memory_on_blips_and_gits_hand_written_attention_runs_one_attention_not_the_models_eager_one(name,
                                                                                                     monkeypatch):
    """The memory's term rides on the SDPA call a plain prefix makes; running the model's own (eager) attention
    beside it made the VQA recipe's memory prefix a third slower than the plain prefix."""
    import transformers.models.blip.modeling_blip as blip
    import transformers.models.blip.modeling_blip_text as blip_text
    import transformers.models.git.modeling_git as git

    pm = memorised(name)
    expected = output(name, pm)
    for cls in (blip.BlipAttention, blip_text.BlipTextSelfAttention, git.GitSelfAttention):
        monkeypatch.setattr(cls, "forward", lambda *a, **k: pytest.fail("the model's own attention ran"))
    with torch.no_grad():
        torch.testing.assert_close(output(name, pm), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ROWS)
@pytest.mark.parametrize("routing", [["m", "a"], ["m", None]], ids=["memory-prefix", "memory-none"])
def test_memory_rows_beside_prefix_rows_and_rows_without_equal_each_row_alone(name, routing):
    pm = routed(name)
    pm.add_prefix("m", PrefixConfig(num_virtual_tokens=4, method="memory", init_std=1.0,
                                    targets=CASES[name].routable or CASES[name].targets))
    with torch.no_grad():
        for value in pm.prefixes["m"].values.values():
            value.normal_()
        mixed = output(name, pm, prefix=routing)
        for row, prefix in enumerate(routing):
            torch.testing.assert_close(real(name, mixed, row), real(name, output(name, pm, prefix=prefix), row),
                                       rtol=1e-5, atol=1e-5, msg=f"row {row} ({prefix})")


@pytest.mark.parametrize("name", GENERATING)
def test_memory_generation_with_and_without_cache_and_routed_beams_equal_a_full_recompute(name):
    """Each new query reads the memory once: greedy decoding (cached or not) equals a full recompute of every step,
    and memory rows beside prefix rows keep their own through greedy and beam search."""
    pm = memorised(name)
    with torch.no_grad():
        reference = _new_tokens(name, _recompute_greedy(name, pm), _start(name, pm))
        start = _start(name, pm)
        start.pop("decoder_input_ids", None)
        scored = dict(return_dict_in_generate=True, max_new_tokens=NEW_TOKENS, do_sample=False,
                      suppress_tokens=suppressed(name))
        for use_cache in (True, False):
            got = _new_tokens(name, pm.generate(**start, **scored, use_cache=use_cache).sequences, _start(name, pm))
            for row in range(got.shape[0]):
                assert _until_eos(got[row], _eos(pm)) == _until_eos(reference[row], _eos(pm)), (row, use_cache)
        targets = CASES[name].routable or CASES[name].targets
        pm.add_prefix("a", PrefixConfig(num_virtual_tokens=3, init_std=1.0, targets=targets))
        pm.add_prefix("m", PrefixConfig(num_virtual_tokens=2, method="memory", init_std=1.0, targets=targets))
        for value in pm.prefixes["m"].values.values():
            value.normal_()
        for beams in (1, 3) if CASES[name].beams else (1,):  # the bare model's beams fail where .beams is False
            mixed = pm.generate(**start, **scored, num_beams=beams, prefix=["m", "a"])
            for row, prefix in enumerate(["m", "a"]):
                alone = pm.generate(**start, **scored, num_beams=beams, prefix=prefix)
                assert _until_eos(mixed.sequences[row], _eos(pm)) == _until_eos(alone.sequences[row], _eos(pm)), \
                    f"row {row} ({prefix}), {beams} beams"


# -- saving, text initialisation, soft prompts ---------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_save_and_load_reproduce_the_outputs(name, tmp_path):
    pm = prefixed(name)
    pm.save_prefix(tmp_path)
    loaded = load_prefix(CASES[name].build(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(output(name, loaded), output(name, pm), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_text_initialisation_through_the_family_processor_reaches_every_site(name):
    def init(text):
        config = PrefixConfig(num_virtual_tokens=3, init="text", init_text=text, targets=CASES[name].targets)
        return add_prefix(CASES[name].build(), config, processor=processor(name)).prefixes["default"]

    first, second = init("what color is the shape"), init("a red circle")
    for site in first.sites:
        keys, values = first.kv(site.name)
        assert keys.abs().sum() > 0 and values.abs().sum() > 0, site.name
        if (site.tower, site.kind) == (CASES[name].text_tower, "self"):  # the text reached this tower
            assert not torch.allclose(keys, second.kv(site.name)[0]), site.name


@pytest.mark.parametrize("name", PROMPTED)
def test_a_soft_prompt_equals_the_same_vectors_read_as_tokens(name):
    pm = add_prefix(CASES[name].build(), PrefixConfig(num_virtual_tokens=3, method="prompt"))
    where = prompt_input(pm.base_model)
    words = torch.tensor([11, 12, 13])
    with torch.no_grad():
        pm.prefixes["default"].embeddings.copy_(where.embedding(words))  # what the embedding module outputs
        got = output(name, pm)
        reference = inputs(name)
        column, batch = where.column, reference["input_ids"].shape[0]

        def insert(tensor, filler):
            return torch.cat([tensor[:, :column], filler, tensor[:, column:]], dim=1)

        mask = reference.get("attention_mask", torch.ones_like(reference["input_ids"]))
        reference["input_ids"] = insert(reference["input_ids"], words.expand(batch, -1))
        reference["attention_mask"] = insert(mask, torch.ones(batch, 3, dtype=torch.long))
        for aligned in where.aligned:
            if aligned in reference:
                tensor = reference[aligned]
                reference[aligned] = insert(tensor, tensor.new_zeros(batch, 3, *tensor.shape[2:]))
        if where.labels_follow_input and "labels" in reference:
            reference["labels"] = insert(reference["labels"], torch.full((batch, 3), -100))
        expected = read(name, CASES[name].build()(**reference))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# -- recipes and evaluation on today's VLMs ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl", "smolvlm", "paligemma"])
def test_vqa_training_scores_only_the_answer_and_answers_come_without_the_prompt(name):
    """Training rows: the family's prompt (a chat turn through the processor's template, PaliGemma's task
    prefix) then the answer; only the answer and the end of text are scored. Generated answers are the tokens
    after the prompt, from the same prompt built by hand."""
    from mmprefix.data import formatting
    from mmprefix.evaluation import decode

    model, proc = CASES[name].build(), processor(name)
    tokenizer = proc.tokenizer
    pictures = tiny_families.images(2)
    batch = formatting.vqa_batch(model, proc, pictures, ["what color is the shape", "what size"], ["red", "small"])
    for row, answer in enumerate(["red", "small"]):
        scored = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert scored == tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert model(**batch).loss.isfinite()

    if name == "paligemma":
        texts = ["answer en what color is the shape"]
    else:
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the shape"}]}]
        texts = [proc.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)]
    inputs = proc(images=[pictures[:1]], text=texts, return_tensors="pt")
    with torch.no_grad():
        new = model.generate(**inputs, max_new_tokens=3, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        answer = decode.answer_questions(model, proc, pictures[:1], ["what color is the shape"], max_new_tokens=3)
    assert answer == decode._decode(tokenizer, new[None])  # the same text clean-up as every decoded output


@pytest.mark.parametrize("name", ["idefics2", "idefics3", "smolvlm"])
def test_a_row_with_two_images_beside_a_text_only_row_is_routed_by_its_images(name):
    """Two images in row 0 and none in row 1: the vision tower's batch of 2 equals the number of rows by
    coincidence, and must still go to row 0 twice (mapped by rows, row 1's prefix reached row 0's second image)."""
    pm, make = routed(name), CASES[name].processor()
    make.tokenizer.padding_side = "right"  # real tokens keep their positions in the batch
    pictures = tiny_families.images(2)
    prompts = [f"<image> <image> {tiny_families.PROMPTS[0]}", tiny_families.PROMPTS[1]]
    with torch.no_grad():
        batch = make(images=[pictures, []], text=prompts, return_tensors="pt", padding=True)
        mixed = pm(**batch, prefix=["a", "b"]).logits
        alone = [pm(**make(images=[pictures], text=prompts[:1], return_tensors="pt"), prefix="a").logits[0],
                 pm(**make(text=prompts[1:], return_tensors="pt"), prefix="b").logits[0]]
    for row, expected in enumerate(alone):
        real = mixed[row][batch["attention_mask"][row].bool()]
        torch.testing.assert_close(real, expected, rtol=1e-5, atol=1e-5, msg=f"row {row}")


def test_a_routed_call_without_input_ids_runs_a_packed_tower_its_prefixes_skip():
    """Qwen-VL's packed vision tower with inputs_embeds (no input_ids: the call's images cannot be mapped to rows):
    routed prefixes that only target the language model give each row what the whole batch gets with that row's
    prefix; a prefix that does reach the tower is still refused (before this, both were refused)."""
    name = "qwen2_vl"
    pm = prefixed(name, targets=["vision"])
    for prefix in ("a", "b"):
        pm.add_prefix(prefix, PrefixConfig(num_virtual_tokens=3, init_std=1.0, targets=["lm"]))
    batch = {k: v for k, v in inputs(name, labels=False).items() if k != "input_ids"}
    batch["inputs_embeds"] = pm.base_model.get_input_embeddings()(inputs(name)["input_ids"])
    with torch.no_grad():
        mixed = pm(**batch, prefix=["a", "b"]).logits
        for row, prefix in enumerate(["a", "b"]):
            torch.testing.assert_close(real(name, mixed, row), real(name, pm(**batch, prefix=prefix).logits, row))
        with pytest.raises(ValueError, match="no input_ids to tell which row each of the call's 2 images"):
            pm(**batch, prefix=["default", "b"])
