"""dlpipe: declarative deep-learning experiment pipelines.

Importing this package is cheap on purpose: it pulls in neither TensorFlow nor MLflow.
Those load only when a pipeline actually runs.
"""

from dlpipe.hookspecs import hookimpl
from dlpipe.params import Params

__version__ = "0.1.0"

__all__ = ["Params", "__version__", "hookimpl"]
