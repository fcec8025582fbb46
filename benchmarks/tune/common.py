"""Shared by the hand-written contestants: the same data split and model as dlpipe."""

import os
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "plugins"))

SEED = 7
EPOCHS = 20
BATCH = 64
LR = (1e-4, 0.3)
L2 = (1e-6, 0.1)


def load_digits():
    """The digits split exactly as the spec's data stage makes it (same seed)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from dlpipe.stages.data import DigitsParams
    from dlpipe.stages.data.sklearn import sklearn_digits

    ctx = types.SimpleNamespace(seed=SEED, data=None, extras={})
    sklearn_digits(ctx, DigitsParams(val_fraction=0.15, test_fraction=0.15))
    return ctx.data
