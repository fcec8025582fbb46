"""Parameter types that several architectures' params classes share.

Pydantic only: the architecture packages' ``__init__`` modules import this, and they
must stay free of Keras and TensorFlow.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

#: An output activation; ``auto`` picks one from the data's value range.
Activation = Literal["auto", "tanh", "sigmoid", "linear"]

#: How a classifier's first layers shrink the image.
Stem = Literal["auto", "imagenet", "small"]


def width_field(default: float = 1.0) -> Any:
    """A width multiplier field that scales every filter count."""
    return Field(default, gt=0.0, le=4.0, description="Width multiplier: scales every filter count.")
