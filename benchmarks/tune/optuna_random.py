# ruff: noqa: I001, E402
"""Plain Optuna contestant: random sampling, no pruning, a hand-written Keras objective.

Prints ``TRIAL COMPLETE <best val_accuracy>`` after every trial.
Usage: python optuna_random.py BUDGET_SECONDS
"""

import sys

from common import BATCH, EPOCHS, L2, LR, SEED, load_digits

import keras
import optuna
from bench_mlp import make_model


def main() -> None:
    budget = float(sys.argv[1])
    data = load_digits()
    optuna.logging.set_verbosity(optuna.logging.ERROR)

    def objective(trial):
        keras.backend.clear_session()
        keras.utils.set_random_seed(SEED)
        model = make_model(data.input_shape, data.num_classes, 64,
                           trial.suggest_float("l2", *L2, log=True))
        model.compile(optimizer=keras.optimizers.Adam(trial.suggest_float("lr", *LR, log=True)),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        history = model.fit(data.x["train"], data.y["train"], epochs=EPOCHS, batch_size=BATCH,
                            validation_data=(data.x["val"], data.y["val"]), verbose=0)
        value = max(history.history["val_accuracy"])
        print(f"TRIAL COMPLETE {value}", flush=True)
        return value

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=SEED),
                                pruner=optuna.pruners.NopPruner())
    study.optimize(objective, timeout=budget)


if __name__ == "__main__":
    main()
