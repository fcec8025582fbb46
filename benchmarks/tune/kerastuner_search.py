# ruff: noqa: I001, E402
"""KerasTuner contestant: RandomSearch or Hyperband over the same space.

Prints ``TRIAL <score>`` after every trial; the benchmark kills it at the budget.
Usage: python kerastuner_search.py random|hyperband WORKDIR
"""

import sys

from common import BATCH, EPOCHS, L2, LR, SEED, load_digits

import keras
import keras_tuner as kt
from bench_mlp import make_model


def main() -> None:
    kind, workdir = sys.argv[1], sys.argv[2]
    data = load_digits()
    keras.utils.set_random_seed(SEED)

    def build(hp):
        model = make_model(data.input_shape, data.num_classes, 64,
                           hp.Float("l2", *L2, sampling="log"))
        model.compile(optimizer=keras.optimizers.Adam(hp.Float("lr", *LR, sampling="log")),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    class Reporting:
        def _configure_tensorboard_dir(self, callbacks, trial, execution=0):
            pass  # KerasTuner imports TensorBoard here; no TensorBoard callback is used

        def on_trial_end(self, trial):
            super().on_trial_end(trial)
            print(f"TRIAL {trial.status} {trial.score}", flush=True)

    common = dict(objective="val_accuracy", seed=SEED, directory=workdir, project_name=kind,
                  overwrite=True)
    if kind == "random":
        tuner = type("Random", (Reporting, kt.RandomSearch), {})(build, max_trials=100000, **common)
    else:
        tuner = type("Band", (Reporting, kt.Hyperband), {})(
            build, max_epochs=EPOCHS, factor=3, hyperband_iterations=1000, **common)
    tuner.search(data.x["train"], data.y["train"], epochs=EPOCHS, batch_size=BATCH,
                 validation_data=(data.x["val"], data.y["val"]), verbose=0)


if __name__ == "__main__":
    main()
