"""Models that travel: the MLflow model dlpipe logs, and loading it anywhere.

A run that logs its model (``tracking.log_model``, the default) logs an *MLflow model*
under the artifact path ``model``:

======================  ================================================================
``MLmodel``             two flavours: ``keras`` (``mlflow.keras.load_model``) and
                        ``python_function`` (``mlflow.pyfunc.load_model``, ``mlflow
                        models serve``), the signature and the input example
``model.keras``         the trained model (``keras.saving.load_model``)
``dlpipe.json``         what ``predict`` needs: the task, the modules that define the
                        model's classes, the data stage's preprocessing, class names,
                        vocabularies
``saved_model/``        an inference-only TensorFlow SavedModel (no dlpipe, no Python
                        classes: ``tf.saved_model.load``), where the architecture exports
``model.onnx``          the same as ONNX, where ``tf2onnx`` is installed and converts it
``requirements.txt``    ``dlpipe==<version>``, tensorflow, keras (and MLflow's env files)
======================  ================================================================

The ``python_function`` flavour is this package (``loader_module: dlpipe.packaging``,
whose ``_load_pyfunc`` MLflow calls): loading imports the modules that define the
model's classes, then the model, so a fresh process needs nothing but
``mlflow.pyfunc.load_model(uri)``. Its ``predict`` takes RAW inputs, as the data source
had them (pixel values, feature tables, text) and applies the data stage's resizing and
normalization itself; what it returns per task is in ``docs/using-models.md``.

The training process never imports MLflow: it writes the pieces into a folder
(:func:`stage_model`) and the tracking process assembles the MLflow model from them
(:func:`save_mlflow_model`). :func:`save_model` does both in one process.

The modules, by job (everything is importable from this package too):

=======================  ===============================================================
:mod:`.layout`           the model folder's file names; reading ``dlpipe.json``
:mod:`.classes`          the modules of a model's custom classes, imported before loading
:mod:`.preprocessing`    the data stage's resizing and normalization, for raw inputs
:mod:`.meta`             what ``dlpipe.json`` says: task, predict mode, inputs
:mod:`.inference`        ``predict`` on raw inputs per mode; the logged input example
:mod:`.export`           the inference-only SavedModel and ONNX exports
:mod:`.saving`           staging the pieces, assembling the MLflow model
:mod:`.loading`          the pyfunc entry point, Keras models, :class:`Predictor`
:mod:`.registry`         model references (run ids, ``runs:/``, ``models:/``), registering
=======================  ===============================================================

Importing this package is cheap (no TensorFlow, no MLflow); the functions import what
they need.
"""

from dlpipe.packaging.classes import (
    architecture_modules,
    import_model_modules,
    register_custom_objects,
)
from dlpipe.packaging.export import export_onnx, export_saved_model
from dlpipe.packaging.inference import decode_rows, example_inputs, predict
from dlpipe.packaging.layout import (
    CODE_DIR,
    EXAMPLE_ROWS,
    FORMAT_VERSION,
    KERAS_FILE,
    META_FILE,
    MODEL_ARTIFACT_PATH,
    ONNX_FILE,
    SAVED_MODEL_DIR,
    read_meta,
)
from dlpipe.packaging.loading import (
    Predictor,
    PyfuncModel,
    _load_pyfunc,
    download,
    load_keras_model,
    load_model_folder,
    load_predictor,
)
from dlpipe.packaging.meta import (
    MODES,
    describe,
    input_description,
    predict_mode,
    signature_params,
    table_encoder,
)
from dlpipe.packaging.preprocessing import Preprocessing, preprocessing_of
from dlpipe.packaging.registry import register_version, registered_source, resolve_model_uri
from dlpipe.packaging.saving import (
    LOADER_MODULE,
    pip_requirements,
    save_mlflow_model,
    save_model,
    stage_model,
)

__all__ = [
    "CODE_DIR",
    "EXAMPLE_ROWS",
    "FORMAT_VERSION",
    "KERAS_FILE",
    "LOADER_MODULE",
    "META_FILE",
    "MODEL_ARTIFACT_PATH",
    "MODES",
    "ONNX_FILE",
    "SAVED_MODEL_DIR",
    "Predictor",
    "Preprocessing",
    "PyfuncModel",
    "_load_pyfunc",
    "architecture_modules",
    "decode_rows",
    "describe",
    "download",
    "example_inputs",
    "export_onnx",
    "export_saved_model",
    "import_model_modules",
    "input_description",
    "load_keras_model",
    "load_model_folder",
    "load_predictor",
    "pip_requirements",
    "predict",
    "predict_mode",
    "preprocessing_of",
    "read_meta",
    "register_custom_objects",
    "register_version",
    "registered_source",
    "resolve_model_uri",
    "save_mlflow_model",
    "save_model",
    "signature_params",
    "stage_model",
    "table_encoder",
]
