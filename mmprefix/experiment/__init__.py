"""The harness around the library that recipes and ``eval/evaluate.py`` share: loading a model for a task
(``loading.py``), the methods compared with prefixes (``methods.py``), and the recipes' common steps
(``recipe.py``)."""
