import random

import numpy as np
import pytest
import torch as th


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same random state, so failures reproduce."""
    random.seed(0)
    np.random.seed(0)
    th.manual_seed(0)
    yield
