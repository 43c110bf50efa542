"""Serving many prefixes on one frozen model: requests for different prefixes (or none) are batched into one
routed call. Needs the ``serve`` extra (``pip install 'mmprefix[serve]'``).

* `Batcher` (``batcher.py``): merges requests that arrive within a window, per group, in a worker thread.
* `Engine`, `Job` (``engine.py``): runs a batch of jobs on one `PrefixModel` (VQA, captions, text, CLIP
  features, zero-shot classification), with the evaluation's formatting and decoding.
* `PrefixService` (``service.py``): engines, a folder of prefixes added and removed while serving, metrics.
* ``server.py``: the HTTP API (FastAPI; ``mmprefix serve``), ``requests.py`` its request bodies and limits, and
  ``page/index.html``, the comparison page;
  ``ray_serve.py``: the same service as a Ray Serve deployment.
"""

from .batcher import Batcher, Closed
from .engine import TASKS, Engine, Job
from .models import DEFAULT_MODEL, load_engines
from .service import BASE, InvalidName, PrefixService, UnknownPrefix

__all__ = ["BASE", "DEFAULT_MODEL", "TASKS", "Batcher", "Closed", "Engine", "InvalidName", "Job", "PrefixService",
           "UnknownPrefix", "load_engines"]
