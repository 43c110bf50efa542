import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests import the tiny-model factories as `tiny`
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
