"""A run's settings, typed and checked before anything is loaded: the one layering scheme of the recipes and of
``mmprefix eval``.

Settings come in layers, each overriding the one before: the dataclasses' defaults, a YAML file, command-line
flags, then ``key=value`` overrides (dotted keys, e.g. ``train.learning_rate=3e-3``). YAML is read with YAML
1.2's booleans and numbers (PyYAML's YAML 1.1 reads ``3e-3`` as text and ``no`` as false). An override's value is
parsed for the field it sets: text fields take the text as written (``"prefix.init_text=describe: a circle"``),
the others a YAML scalar or a flow-style ``[...]`` / ``{...}``. Each layer is checked against the dataclasses as it
comes: an unknown key or a value of the wrong type is one `SettingsError` line naming the source, the key and what
is valid; the merged settings then run the dataclasses' own checks. Nothing here imports anything heavy:
``--help`` and every one of these errors answer before torch loads.

``yamlfile``: reading YAML; ``layers``: the layering engine; ``recipes``: the recipes' schema and flags;
``evaluation``: ``mmprefix eval``'s schema; ``runner``: how a command ends.
"""

from .yamlfile import SettingsError, parse_yaml, read_yaml
from .layers import check_layer, check_path_variables, layered, override_layer, set_in, unset_variables
from .recipes import (AdapterOptions, DataSettings, EvalSection, FLAGS, FullOptions, GENERATION_INTEGERS, METHODS,
                      MemoryOptions, ON_BAD_IMAGE, PrefixOptions, PromptOptions, RecipeSettings, Split, prefix_recipe,
                      recipe_parser, recipe_settings)
from .evaluation import EvaluationSettings, REQUIRED_FOR_EVALUATION, evaluation_settings
from .runner import run

__all__ = [
    "AdapterOptions", "DataSettings", "EvalSection", "EvaluationSettings", "FLAGS", "FullOptions", "GENERATION_INTEGERS",
    "MemoryOptions", "METHODS", "ON_BAD_IMAGE", "PrefixOptions", "PromptOptions", "REQUIRED_FOR_EVALUATION", "RecipeSettings",
    "SettingsError", "Split", "check_layer", "check_path_variables", "evaluation_settings", "layered",
    "override_layer", "parse_yaml", "prefix_recipe", "read_yaml", "recipe_parser", "recipe_settings", "run", "set_in",
    "unset_variables"
]
