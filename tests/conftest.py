import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests import the tiny-model factories as `tiny`
# One thread: the tiny models gain nothing from a second one, and on this shared 2-core machine each op's OpenMP
# start then costs more than the op (test_attention + test_generate at load 8: 144 s with two threads, 33 s with one).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def blip_folder(tmp_path_factory):
    """The serving tests' BLIP prefixes (``serve_tiny.save_prefixes``), saved once per module."""
    import serve_tiny

    folder = tmp_path_factory.mktemp("prefixes")
    serve_tiny.save_prefixes(folder)
    return folder
