"""Models for the harness: loading a model for a task (``loading``: hub ids, local folders, ``embedded:NAME``,
quantized bases), the methods compared with prefixes (``methods``: prefix, soft prompt, memory, LoRA, adapters,
full fine-tuning) and the bottleneck adapters (``adapters``)."""
