"""What the commands use when told nothing; importing it loads nothing (``mmprefix --help`` stays fast)."""

DEFAULT_MODEL = "embedded:blip"  # the model `mmprefix serve` and the Ray Serve application serve by default
