"""The seed's use cases: instruction following (recipes/instruct.py) and preference alignment (recipes/align.py).

The data builders are checked against the world's own records; each recipe runs end to end on tiny settings in
the default suite, and as written (its goal included) in the slow one."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmprefix.data import read_samples, synthetic
from mmprefix.experiment import instructions, preferences
from mmprefix.models import loading

ROOT = Path(__file__).resolve().parents[2]
RECIPES = {name: ROOT / "recipes" / f"{name}.py" for name in ("instruct", "align")}


def load(name):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES[name])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_preference_pairs_are_right_against_wrong_in_exactly_one_attribute():
    samples = read_samples("text", loading.data_path("world:text_b_val"))[:200]
    pairs = preferences.record_pairs(samples, seed=0)
    changed = set()
    for sample, chosen, rejected in zip(samples, pairs["chosen"], pairs["rejected"]):
        assert chosen == f" {sample.target}"
        assert preferences.attributes_right(chosen, sample.prompt) and not preferences.attributes_right(rejected, sample.prompt)
        differ = [(a, b) for a, b in zip(chosen.split(), rejected.split()) if a != b]
        assert len(differ) == 1 and len(chosen.split()) == len(rejected.split()), (chosen, rejected)
        kind = next(k for k, values in preferences.ATTRIBUTES.items() if differ[0][1] in values)
        assert differ[0][0] in preferences.ATTRIBUTES[kind], "a value of the same kind, not any word"
        changed.add(kind)
    assert changed == {"shape", "color", "size"}
    assert preferences.attributes_right("a small red circle", "shape=circle color=red size=small ->")
    assert not preferences.attributes_right("a small red circle and a blue square", "shape=circle color=red size=small ->")


def test_scene_rows_answer_from_the_worlds_own_captions():
    captions = read_samples("caption", loading.data_path("world:captions_a_val"))[:40]
    rows = instructions.scene_rows(captions, seed=0)
    assert [r.task for r in rows[:4]] == list(instructions.TASKS) and len(rows) == 4 * len(captions)
    for sample, (count, caption, answer, describe) in zip(captions, zip(*[iter(rows)] * 4)):
        objects = sample.captions[0].split(": ")[1].split(" and ")  # "a small red circle", ... left to right
        assert count.answer == sample.captions[0].split()[0] == synthetic.COUNTS[len(objects) - 1]
        assert caption.answer == sample.captions[0] and count.scene.count("shape=") == len(objects)
        chosen = objects[0] if answer.side == "left" else objects[-1]
        assert answer.answer == chosen.split()[2] and describe.answer == chosen and describe.side == answer.side


def test_instruction_sets_hold_phrasings_and_combinations_training_never_saw():
    rows = instructions.load_rows("world:captions_a_val", seed=0, limit=60)
    train = instructions.phrased(rows, "train", seed=0)
    sets = {kind: instructions.phrased(rows, kind, seed=1) for kind in instructions.SETS}
    by_id = {row.id: row for row in rows}

    def pattern(task, sample):
        """The (task, core, frame) a sample's prompt was made of."""
        row = by_id[sample.id.rsplit(":", 1)[0]]
        asked = sample.prompt.removeprefix(f"{row.scene} ").removesuffix(" =>")
        return next((task, core, frame) for core in range(len(instructions.TASKS[task]))
                    for frame in range(len(instructions.FRAMES)) if instructions.phrasing(row, core, frame) == asked)

    trained = {pattern(task, sample) for task, sample in train}
    for kind, samples in sets.items():
        assert len(samples) == len(rows)
        asked = {pattern(task, sample) for task, sample in samples}
        assert asked <= trained if kind == "seen" else not asked & trained, kind
    combos = {(task, frame) for task, _, frame in (pattern(t, s) for t, s in sets["held-out combinations"])}
    assert combos == {(task, instructions.skipped_frame(task)) for task in instructions.TASKS}
    assert {(task, frame) for task, _, frame in trained} == {
        (task, frame) for task in instructions.TASKS for frame in range(len(instructions.FRAMES))
        if frame != instructions.skipped_frame(task)}, "every other frame is trained with every task"


def test_row_mean_loss_weights_each_row_alike_whatever_its_length():
    """row_mean_loss on a padded batch of a two-token answer and a long caption equals the mean of the loss
    transformers computes for each row alone (its own token mean), and routes rows to the prefix it is given."""
    import torch

    from mmprefix import PrefixConfig, add_prefix
    from mmprefix.data import formatting
    from mmprefix.embedded import load_backbone

    torch.manual_seed(0)
    model, tokenizer = load_backbone("lm")
    model = add_prefix(model, PrefixConfig(num_virtual_tokens=4))
    rows = instructions.phrased(instructions.load_rows("world:captions_a_val", seed=0, limit=2), "train", seed=0)
    rows = [rows[0], rows[1], rows[4]]  # count ("two"), caption (many tokens), count
    assert len({len(sample.target.split()) for _, sample in rows}) > 1

    def batch(picked):
        inputs = formatting.prompt_and_target(tokenizer, [s.prompt for _, s in picked], [s.target for _, s in picked])
        return {**inputs, "prefix": [task for task, _ in picked]}

    with torch.no_grad():
        alone = [model(**{k: v for k, v in batch([row]).items() if k != "prefix"}, prefix="default").loss
                 for row in rows]
        together = instructions.row_mean_loss(model, batch(rows), "default")
        torch.testing.assert_close(together, torch.stack(alone).mean(), rtol=1e-5, atol=1e-5)
        with model.disable_prefix():
            frozen = instructions.row_mean_loss(model, batch(rows), "default")
        assert not torch.allclose(together, frozen), "the prefix it is given must change the loss"


def test_the_align_recipe_runs_end_to_end(tmp_path, capsys):
    summary = load("align").main([f"output_dir={tmp_path}", "train.max_steps=2", "train.batch_size=4",
                                  "data.train.limit=16", "data.test.limit=8"])
    printed = capsys.readouterr().out
    assert summary["zero_shot"]["preference_accuracy"] == 50.0, "the gated prefix starts as the reference"
    assert summary["zero_shot"]["reward_margin"] == 0.0 and summary["base_weights_unchanged"]
    assert "preference accuracy on held-out pairs (%): 50.00 ->" in printed and "base weights unchanged: yes" in printed
    assert (tmp_path / "prefix" / "prefix.safetensors").is_file()
    assert json.loads((tmp_path / "metrics.json").read_text()) == summary


def test_the_instruct_recipe_runs_end_to_end(tmp_path, capsys):
    summary = load("instruct").main([f"output_dir={tmp_path}", "train.max_steps=2", "train.batch_size=4",
                                     "data.train.limit=8", "data.test.limit=2", "eval.generation.max_new_tokens=3"])
    printed = capsys.readouterr().out
    assert set(summary["results"]) == {"frozen", "instruction prefix", "per-task prefixes"}
    assert all(set(sets) == set(instructions.SETS) for sets in summary["results"].values())
    assert "held-out phrasings: the instruction prefix" in printed
    assert (tmp_path / "instruction" / "prefix" / "prefix.safetensors").is_file()
    assert summary["zero_shot"] == {kind: summary["results"]["frozen"][kind]["mean"] for kind in instructions.SETS}
    assert all((tmp_path / "per-task" / "prefix" / task / "prefix.safetensors").is_file() for task in instructions.TASKS)


@pytest.mark.slow
def test_the_align_recipe_as_written_reaches_its_goal(tmp_path):
    """recipes/align.py as written: held-out preference accuracy from chance to at least 90%, the base untouched."""
    result = subprocess.run([sys.executable, str(RECIPES["align"]), "--output-dir", str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["zero_shot"]["preference_accuracy"] == 50.0 and metrics["tuned"]["preference_accuracy"] >= 90
    assert metrics["tuned"]["reward_margin"] > 0 and metrics["base_weights_unchanged"]


@pytest.mark.slow
def test_the_instruct_recipe_as_written_trains_and_reports_its_gap(tmp_path):
    """recipes/instruct.py as written: the per-task prefixes learn their tasks far above the frozen model, and the
    recipe prints the instruction prefix's held-out score against them. Its goal (within 5 points) is missed, as
    docs/guides/trainers.md reports with the settings tried; this test pins what the recipe measures, not the goal."""
    result = subprocess.run([sys.executable, str(RECIPES["instruct"]), "--output-dir", str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["per_task_prefixes"]["seen"] >= metrics["zero_shot"]["held-out phrasings"] + 20, metrics
    held_out = metrics["tuned"]["held-out phrasings"]
    assert f"held-out phrasings: the instruction prefix {held_out:.1f}" in result.stdout, result.stdout[-2000:]


@pytest.mark.parametrize("name", ["instruct", "align"])
def test_the_use_case_recipes_train_a_prefix_only(name):
    from mmprefix.experiment.settings import SettingsError

    with pytest.raises(SettingsError, match=rf"recipes/{name}.py trains a prefix: method must be prefix \(got 'lora'\)"):
        load(name).main(["--method", "lora"])
    with pytest.raises(SettingsError, match="data.test must be set"):
        load(name).main(["data.test=null"])
