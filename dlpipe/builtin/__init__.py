"""dlpipe's built-in plugins.

Each module here is an ordinary plugin: it implements hooks from
:mod:`dlpipe.hookspecs` with ``@hookimpl`` exactly as a third-party package would, and
keeps TensorFlow out of its imports by registering ``"module:function"`` strings.
"""

BUILTIN_PLUGINS: tuple[str, ...] = (
    "dlpipe.builtin.data",
    "dlpipe.builtin.augment",
    "dlpipe.builtin.training",
    "dlpipe.builtin.evaluation",
    "dlpipe.builtin.strategies",
    "dlpipe.builtin.tracking",
    "dlpipe.builtin.tune",
    "dlpipe.builtin.vae",
    "dlpipe.builtin.generative",
    "dlpipe.builtin.vision",
    "dlpipe.builtin.sequence",
    "dlpipe.builtin.shapes",
    "dlpipe.builtin.superres",
    "dlpipe.builtin.diffusion",
    "dlpipe.builtin.quality",
    "dlpipe.builtin.segmentation",
    "dlpipe.builtin.detection",
    "dlpipe.builtin.vit",
    "dlpipe.builtin.multimodal",
)
