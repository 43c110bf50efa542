"""The library: what a prefix is (``config``), where it goes (``families``, ``architectures``, ``targets``,
``media``, ``reach``), the model that holds and routes prefixes (``model``, ``store``, ``routing``, ``attention/``),
and saving, soft prompts, text initialisation, image conditioning and composition. Nothing here imports the
harness around it (data, models, training, evaluation, serving, experiment); ``tests/test_layout.py`` checks that.
Its public names are those of ``mmprefix``."""
