"""Settings are typed and checked before anything loads: YAML 1.2 numbers, unknown keys and wrong types as one line
naming the source and the valid keys, for the recipes and eval/evaluate.py alike; --help without torch."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mmprefix.experiment import settings
from mmprefix.experiment.settings import SettingsError

ROOT = Path(__file__).resolve().parents[2]
VQA_YAML = ROOT / "recipes" / "configs" / "vqa.yaml"


def parse(*argv, config=VQA_YAML):
    return settings.recipe_settings(["--config", str(config), *argv], "vqa", VQA_YAML)


def refused(*argv, config=VQA_YAML):
    with pytest.raises(SettingsError) as err:
        parse(*argv, config=config)
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("argv, words", [
    (["train.learnin_rate=0.01"], ["train.learnin_rate is not a setting", "did you mean 'learning_rate'",
                                    "train takes: batch_size, eval_every"]),
    (["prefix.num_virtual_token=8"], ["prefix.num_virtual_token is not a setting", "'num_virtual_tokens'"]),
    (["trian.max_steps=2"], ["trian is not a setting", "did you mean 'train'", "valid keys are: adapter, data, eval"]),
    (["train.max_steps=abc"], ["train.max_steps must be an integer, got text 'abc'"]),
    (["train.max_steps=1e3"], ["train.max_steps must be an integer, got number 1000.0"]),
    (["--save-every", "-1"], ["save_every must be >= 0, got -1"]),
    (["--max-steps", "0"], ["max_steps must be >= 1"]),
    (["train.learning_rate=-1"], ["learning_rate and max_grad_norm must be > 0"]),
    (["train.learning_rate=.nan"], ["train.learning_rate must be a finite number"]),
    (["prefix.init=randum"], ["init must be one of"]),
    (["method=ia3"], ["method must be one of prefix, prompt, memory, lora, adapter, full"]),
    (["memory.method=prefix"], ["memory.method must stay 'memory'"]),
    (["adapter.width=0"], ["adapter.width must be >= 1"]),
    (["lora.rank=4"], ["lora.rank is not a setting", "lora takes:", "lora_alpha"]),
    (["data.val.limit=0"], ["data.val: limit must be >= 1"]),
    (["method=lora", "lora.learning_rate=abc"], ["lora.learning_rate"]),
    (["quantize=int3"], ["quantize must be one of int8, int4 or unset"]),
    (["quantize=int8", "train.fsdp=true"], ["quantize='int8' and train.fsdp=true do not combine"]),
    (["data.on_bad_image=ignore"], ["on_bad_image must be 'error' or 'skip'"]),
    (["train.max_steps.x=1"], ["train.max_steps is a value, not a section"]),
    (["data.train.path=$MMPREFIX_UNSET_VARIABLE/q.json"], ["data.train.path uses $MMPREFIX_UNSET_VARIABLE, which is not set"]),
    (["data.test.options.annotations=${MMPREFIX_UNSET_VARIABLE}/a.json"], ["data.test.options.annotations uses"]),
])
def test_a_bad_setting_is_one_line_naming_it(argv, words):
    message = refused(*argv)
    assert all(w in message for w in words), message


@pytest.mark.parametrize("text, words", [
    ("- a\n- list\n", ["must hold a mapping of settings"]),
    ("model: [unclosed\n", ["is not valid YAML at line 2"]),
    ("model: embedded:blip\ntrain:\n  learnin_rate: 0.1\n", ["train.learnin_rate is not a setting"]),
    ("model: embedded:blip\ntrain: 3\n", ["train must be a mapping of settings"]),
    ("model: embedded:blip\nunknown_section: {a: 1}\n", ["unknown_section is not a setting"]),
    ("model: embedded:blip\ndata: {train: {format: jsonl}}\n", ["data.train lacks required setting(s) data.train.path"]),
    ("method: lora\n", ["settings lacks required setting(s) model"]),
])
def test_a_bad_yaml_file_is_one_line_naming_the_file(text, words, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    message = refused(config=config)
    assert all(w in message for w in words) and (str(config) in message or "settings" in message), message


def test_classification_data_takes_no_reader_format():
    config = ROOT / "recipes" / "configs" / "classification.yaml"
    with pytest.raises(SettingsError, match=r"data.test: classification reads \{image, label\} JSONL"):
        settings.recipe_settings(["data.test.format=jsonl"], "classification", config)


def test_yaml_is_read_as_yaml_1_2():
    text = "a: 3e-3\nb: 1.0e+5\nc: no\nd: off\ne: true\nf: 010\ng: .inf\nh: 12\ni: -4\nj: 1_000\n"
    assert settings.parse_yaml(text, "test") == {"a": 0.003, "b": 100000.0, "c": "no", "d": "off", "e": True,
                                                  "f": 10.0, "g": float("inf"), "h": 12, "i": -4, "j": "1_000"}


def test_layers_override_in_order_and_sections_merge(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(textwrap.dedent("""\
        model: embedded:blip:vqa
        output_dir: out/{method}-run
        full: {learning_rate: 1e-05}
        train: {max_steps: 10, learning_rate: 2e-2, save_every: 5}
        eval: {generation: {max_new_tokens: 4, num_beams: 2}}
        data: {train: {path: "world:vqa_downstream_train", limit: 8}}
        """))
    run = parse("--max-steps", "20", "eval.generation.num_beams=5", "train.save_every=2", config=config)
    assert (run.train.max_steps, run.train.save_every, run.train.learning_rate) == (20, 2, 0.02)
    assert run.eval.generation == {"max_new_tokens": 4, "num_beams": 5}, "a key inside a mapping, set alone"
    assert run.data.train.limit == 8 and run.data.train.path == "world:vqa_downstream_train"
    assert run.output_dir == "out/prefix-run"
    full = parse("--method", "full", config=config)
    assert full.train.learning_rate == 1e-05 and isinstance(full.train.learning_rate, float)
    assert full.output_dir == "out/full-run"


PREFIX_ONLY = ("align", "instruct")


def test_every_shipped_recipe_config_is_valid(monkeypatch):
    for variable in ("VQAV2", "COCO", "IMAGENET", "TEXTGEN"):
        monkeypatch.setenv(variable, "/data")
    for path in sorted((ROOT / "recipes" / "configs").glob("*.yaml")):
        run = parse(config=path)
        assert "{method}" not in run.output_dir, path
        if path.stem not in PREFIX_ONLY:  # the use-case recipes train a prefix only: no folder per method
            assert run.output_dir.endswith("/prefix"), path


def test_evaluate_uses_the_same_layering(tmp_path):
    from mmprefix.experiment import evaluate as cli

    config = tmp_path / "eval.yaml"
    config.write_text("task: vqa\nmodel: embedded:blip\ndata: world:vqa_downstream_test\noutput-dir: out/e\n"
                      "num_beams: 2\n")
    run = cli.settings_from(["--config", str(config), "--limit", "5", "max_new_tokens=3", "data_options.split=val"])
    assert (run.task, run.num_beams, run.limit, run.max_new_tokens, run.output_dir) == ("vqa", 2, 5, 3, "out/e")
    assert run.data_options == {"split": "val"}
    for argv, words in [(["num_beam=3"], "num_beam is not a setting (did you mean 'num_beams'?)"),
                        (["--limit", "0"], "limit, batch_size, num_beams and max_new_tokens must be >= 1"),
                        (["task=captioning"], "task must be one of vqa, caption, text, classification, retrieval"),
                        (["examples=many"], "examples must be an integer, got text 'many'")]:
        with pytest.raises(cli.UsageError, match=words.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
            cli.settings_from(["--config", str(config), *argv])
    config.write_text("task: vqa\nmodel: embedded:blip\nbatch-sise: 3\n")
    with pytest.raises(cli.UsageError, match="batch_sise is not a setting"):
        cli.settings_from(["--config", str(config), "--data", "x", "--output-dir", "y"])
    with pytest.raises(cli.UsageError, match="missing --data, --output-dir"):
        cli.settings_from(["--task", "vqa", "--model", "m"])


@pytest.mark.parametrize("prefix, words", [
    ("justaname", "--prefix must look like KEY=VALUE, got 'justaname'"),
    ("p=", "--prefix p=: DIR is not a folder (a prefix folder, e.g. out/vqa/prefix)"),
    ("p={missing}", "--prefix p={missing}: {missing} is not a folder (a prefix folder, e.g. out/vqa/prefix)"),
])
def test_evaluate_refuses_a_bad_prefix_before_the_model_loads(prefix, words, tmp_path, monkeypatch, capsys):
    from mmprefix.experiment import evaluate as cli

    from mmprefix.models import loading

    monkeypatch.setattr(loading, "load_model", lambda *args: pytest.fail("the model loaded"))
    missing = str(tmp_path / "nowhere")
    argv = ["--task", "vqa", "--model", "m", "--data", "d", "--output-dir", str(tmp_path), "--prefix",
            prefix.format(missing=missing)]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"mmprefix eval: error: {words.format(missing=missing)}"


@pytest.mark.parametrize("command", [
    ["recipes/vqa.py", "--help"], ["recipes/classification.py", "--help"], ["eval/evaluate.py", "--help"],
    ["-m", "mmprefix.cli", "sites", "--help"], ["recipes/textgen.py", "trian.max_steps=2"],
])
def test_help_and_setting_errors_answer_before_torch_loads(command):
    """The entry points answer --help (and refuse bad settings) without importing torch or transformers."""
    probe = textwrap.dedent(f"""\
        import runpy, sys
        sys.argv = {command!r}
        try:
            if sys.argv[0] == "-m":
                sys.argv = sys.argv[1:]
                runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(sys.argv[0], run_name="__main__")
        except SystemExit as code:
            print("exit", code.code)
        print("loaded:", sorted(m for m in ("torch", "transformers", "peft", "accelerate") if m in sys.modules))
        """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "loaded: []" in result.stdout, result.stdout + result.stderr
    if "--help" in command:
        assert "exit 0" in result.stdout and "usage:" in result.stdout
    else:
        assert "trian is not a setting" in result.stderr


def evaluate_parser():
    from mmprefix.experiment import evaluate as cli

    return cli.build_parser()


def test_every_flag_has_help_and_the_examples_are_a_list():
    from mmprefix import cli

    for parser in (settings.recipe_parser(None, VQA_YAML), evaluate_parser(), cli.build_parser()):
        for action in parser._actions:
            assert action.help, f"{action.option_strings or action.dest} has no help text"
    help_text = subprocess.run([sys.executable, "recipes/vqa.py", "--help"], capture_output=True, text=True,
                               cwd=ROOT, timeout=60).stdout
    examples = help_text.split("examples:")[1].split("\n\n")[0].strip().splitlines()
    assert len(examples) >= 4 and all(line.strip().startswith(("python", "accelerate")) for line in examples)


def test_resume_compares_the_quantization_of_the_base():
    # a run resumed on an int8 base is another run (before: quantize was missing from identity())
    assert parse("quantize=int8").identity() != parse().identity()


@pytest.mark.parametrize("argv, words", [
    (["prefix.learning_rate=0"], ["settings: prefix: learning_rate must be > 0, got 0"]),
    (["--method", "prompt", "prompt.learning_rate=-0.1"], ["prompt: learning_rate must be > 0, got -0.1"]),
    (["--method", "full", "full.learning_rate=-1"], ["full: learning_rate must be > 0, got -1"]),
    (["--method", "lora", "lora.learning_rate=-1"], ["settings: lora.learning_rate must be > 0, got -1.0"]),
    (["lora.learning_rate=0"], ["lora.learning_rate must be > 0"]),  # refused whichever method runs
    (["prefix.num_virtual_tokens=0"], ["num_virtual_tokens must be >= 1 to train, got 0"]),
    (["eval.generation.num_beams=abc"], ["eval.generation.num_beams must be an integer >= 1, got 'abc'"]),
    (["eval.generation.max_new_tokens=-5"], ["eval.generation.max_new_tokens must be an integer >= 1, got -5"]),
    (["eval.generation={max_new_tokens: 2.5}"], ["eval.generation.max_new_tokens must be an integer"]),
    (["output_dir="], ["output_dir is empty: name the folder the run writes into"]),
    (["--output-dir", " "], ["output_dir is empty"]),
])
def test_settings_that_used_to_crash_after_the_model_loaded_are_refused_first(argv, words):
    message = refused(*argv)
    assert all(w in message for w in words), message


def test_a_repeated_yaml_key_is_refused_naming_it_and_both_lines(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: embedded:blip\ntrain:\n  learning_rate: 0.1\n  max_steps: 4\n  learning_rate: 0.5\n")
    assert refused(config=config) == (f"{config} is not valid YAML at line 5, column 3: 'learning_rate' is set twice "
                                      "(lines 3 and 5); keep one")
    config.write_text("base: &base {max_steps: 4, learning_rate: 0.1}\nmodel: embedded:blip\ntrain:\n  <<: *base\n"
                      "  learning_rate: 0.2\n")  # overriding a merged key is YAML's own way, not a repeat
    with pytest.raises(SettingsError, match="base is not a setting"):
        parse(config=config)


def test_the_engine_and_evaluate_refuse_an_empty_output_dir(tmp_path):
    from mmprefix.training import TrainConfig

    with pytest.raises(ValueError, match="output_dir is empty"):
        TrainConfig(output_dir="")
    with pytest.raises(SettingsError, match="output_dir is empty"):
        settings.evaluation_settings(None, {"task": "vqa", "model": "m", "data": "d", "output_dir": ""}, [])
    with pytest.raises(SettingsError, match="max_new_tokens must be >= 1"):
        settings.evaluation_settings(None, {"task": "vqa", "model": "m", "data": "d", "output_dir": "o"},
                                     ["max_new_tokens=-5"])


def test_mmprefix_eval_is_the_evaluation_harness(capsys):
    """`mmprefix eval` and `python eval/evaluate.py` run the same command (its options, its errors)."""
    from mmprefix.cli import main

    with pytest.raises(SystemExit) as shown:
        main(["eval", "--help"])
    assert shown.value.code == 0 and "--prefix NAME=DIR" in capsys.readouterr().out
    assert main(["eval", "--task", "vqa", "--model", "m"]) == 2
    assert "mmprefix eval: error: missing --data, --output-dir" in capsys.readouterr().err
    script = subprocess.run([sys.executable, str(ROOT / "eval" / "evaluate.py"), "--task", "vqa", "--model", "m"],
                            capture_output=True, text=True)
    assert script.returncode == 2 and "mmprefix eval: error: missing --data, --output-dir" in script.stderr
