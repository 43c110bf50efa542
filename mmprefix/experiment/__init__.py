"""The harness around the library that recipes and ``mmprefix eval`` share: loading a model for a task
(``loading.py``), the methods compared with prefixes (``methods.py``), the recipes' common steps (``recipe.py``),
settings (``settings/``) and the evaluation command (``evaluate.py``, also ``eval/evaluate.py``)."""
