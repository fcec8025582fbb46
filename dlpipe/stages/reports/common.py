"""What the evaluate reports share: class names made safe for metric names."""

from __future__ import annotations

import re


def metric_suffix(name: str) -> str:
    """A class name as part of a metric name (letters, digits, ``_ . -``):
    ``"traffic light"`` -> ``traffic_light``; ``"class"`` when nothing is left."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "class"
