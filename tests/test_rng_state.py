"""A checkpoint's random state brings back every generator a rank uses."""

import random

import numpy as np
import torch

from gptdist.train_loop import restore_rng_state, rng_state


def draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_torch_numpy_and_python_generators_are_restored():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # leaves a cached Gaussian in numpy's state
    saved = rng_state()
    expected = draws()
    draws()  # move every generator on
    restore_rng_state(saved)
    assert draws() == expected


def test_a_checkpoint_from_before_keeps_loading():
    saved = rng_state()
    saved["numpy"], saved["python"] = "[1, 2, 3]", "[4, 5, 6]"  # the bare key lists written earlier
    restore_rng_state(saved)  # torch's state is restored, the rest left as it is
