"""Kept for packages saved before the data stages were split into modules: their
metadata names ``dlpipe.stages.data.loaders:TablePreprocessing`` as the table encoder,
and loading imports it from here. The stages are in the other modules of this package."""

from dlpipe.stages.data.tables import TablePreprocessing

__all__ = ["TablePreprocessing"]
