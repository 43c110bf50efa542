"""Malformed data is one line naming the file and the record, before anything trains: classification JSONL
fields of the wrong type, an empty split, a CSV that the datasets library cannot parse."""

import importlib.util
import json
from pathlib import Path

import pytest

from mmprefix.data import AnnotationError, read_samples
from mmprefix.data.classification import read_classification
from mmprefix.experiment import settings

VQA_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "vqa.py"


def jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("row, words", [
    ({"image": "b.png", "label": None}, "line 2: 'label' is null"),  # before: silently the class "None"
    ({"image": 5, "label": "cat"}, "line 2: 'image' must be a string, got int 5"),  # before: a raw TypeError
    ({"image": "b.png", "label": ["cat"]}, "line 2: 'label' must be an integer or a string, got list"),
    ({"image": "b.png"}, "line 2: missing key 'label'"),
    ({"image": " ", "label": "cat"}, "line 2: 'image' and 'label' must not be empty"),
    ('{"image": "b.png", "label": ', "line 2: invalid JSON"),
])
def test_a_bad_classification_record_is_refused_naming_file_and_line(row, words, tmp_path):
    path = jsonl(tmp_path / "train.jsonl", [{"image": "a.png", "label": 3}, row])
    with pytest.raises(AnnotationError) as err:
        read_classification(path)
    assert str(err.value).startswith(f"{path}: {words}"), str(err.value)


def test_integer_labels_still_name_their_class_and_an_empty_file_is_refused(tmp_path):
    samples, classes = read_classification(jsonl(tmp_path / "a.jsonl", [{"image": "a.png", "label": 3}]))
    assert samples == [(str(tmp_path / "a.png"), "3")] and classes == ["3"]
    with pytest.raises(AnnotationError, match="holds no records"):
        read_classification(jsonl(tmp_path / "empty.jsonl", []))


def test_a_malformed_csv_read_through_datasets_names_the_file_and_row(tmp_path):
    """Before: datasets' "An error occurred while generating the dataset", naming neither."""
    csv = tmp_path / "questions.csv"
    csv.write_text('image,question,answer\na.png,what?,yes\nb.png,"unclosed,no\n')
    with pytest.raises(AnnotationError) as err:
        read_samples("vqa", "csv", format="hf", data_files=str(csv), cache_dir=str(tmp_path / "cache"))
    assert str(err.value).startswith(f"{csv}: reading: ParserError: ") and "row 2" in str(err.value)


def test_an_empty_training_split_ends_the_recipe_with_one_line(tmp_path, capsys):
    """Before: the sampler's "num_samples should be a positive integer value" traceback, after the model loaded."""
    empty = jsonl(tmp_path / "empty.jsonl", [])
    spec = importlib.util.spec_from_file_location("recipe_vqa", VQA_RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = settings.run(module.main, [f"output_dir={tmp_path / 'out'}", f"data.train={{path: {empty}}}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"recipe: error: the train data '{empty}' ({empty}) holds no samples; "
                                            "fix data.train.path")
