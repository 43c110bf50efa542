"""Serving many prefixes on one frozen model: requests for different prefixes (or none) are batched into one
routed call. Needs the ``serve`` extra (``pip install 'mmprefix[serve]'``).

* `Scheduler` (``scheduler.py``): step-level (continuous) batching: requests join the running batch at the
  next decoding step and leave it when they finish (``decoding.py`` its rows and lanes, ``steppers.py`` one
  step of a model, ``cache_rows.py`` the cache rows that join and leave, ``sampling.py`` picking tokens and
  ending rows, ``inputs.py`` each request's prompt).
* `Batcher` (``batcher.py``): request-level batching: requests that arrive within a window, per group, in one
  batch that runs to its end (``generate.py``: a batch through transformers' ``generate``).
* `Engine`, `Job`, `Completion` (``engine.py``, ``jobs.py``): checks and runs requests on one `PrefixModel`
  (VQA, captions, text, chat, CLIP features, zero-shot classification), with the evaluation's formatting and
  decoding.
* `PrefixService` (``service.py``): engines, a folder of prefixes added and removed while serving, metrics.
* ``server.py``: the HTTP API (FastAPI; ``mmprefix serve``), ``requests.py`` its request bodies and limits, and
  ``page/index.html``, the comparison page;
  ``ray_serve.py``: the same service as a Ray Serve deployment.
"""

from .batcher import Batcher, Closed
from .engine import TASKS, Engine, Job
from .jobs import ClientGone, Completion
from .models import DEFAULT_MODEL, load_engines
from .scheduler import Scheduler
from .service import BASE, InvalidName, PrefixService, UnknownPrefix

__all__ = ["BASE", "DEFAULT_MODEL", "TASKS", "Batcher", "ClientGone", "Closed", "Completion", "Engine", "InvalidName",
           "Job", "PrefixService", "Scheduler", "UnknownPrefix", "load_engines"]
