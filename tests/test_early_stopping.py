"""Early stopping: patience counts from gains above min_delta; the weights kept are the best epoch's, later on a tie."""
from __future__ import annotations

import keras
import numpy as np

from tasks.checkpoints import ResumableEarlyStopping


def run_epochs(stopping: ResumableEarlyStopping, model: keras.Model, accuracies: list[float],
               first_epoch: int = 0) -> list[int]:
    """Drive the callback as fit() does; each epoch's weights are marked with the epoch number. The epochs run."""
    stopping.set_model(model)
    stopping.on_train_begin()
    run = []
    for epoch, accuracy in enumerate(accuracies, start=first_epoch):
        model.set_weights([np.full(w.shape, float(epoch), w.dtype) for w in model.get_weights()])
        stopping.on_epoch_end(epoch, {"val_accuracy": accuracy})
        run.append(epoch)
        if model.stop_training:
            break
    return run


def tiny_model() -> keras.Model:
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.stop_training = False
    return model


def kept_epoch(model: keras.Model, stopping: ResumableEarlyStopping) -> float:
    model.set_weights(stopping.best_weights)
    return float(model.get_weights()[0].flat[0])


def test_a_later_gain_below_min_delta_is_kept_but_does_not_extend_patience():
    model, stopping = tiny_model(), ResumableEarlyStopping(patience=3, min_delta=0.005)

    # a cosine-decayed fine-tune: 0.9117 clears min_delta; 0.9150 and 0.9160 are gains below it
    run = run_epochs(stopping, model, [0.778, 0.882, 0.903, 0.9117, 0.9150, 0.9133, 0.9160, 0.95])

    assert run == [0, 1, 2, 3, 4, 5, 6]  # three epochs after 0.9117 without a gain above min_delta: stop
    assert (stopping.best_epoch, stopping.best) == (6, 0.9160)
    assert kept_epoch(model, stopping) == 6.0
    assert stopping.stopped_epoch == 6


def test_a_tie_keeps_the_later_epoch():
    model, stopping = tiny_model(), ResumableEarlyStopping(patience=5, min_delta=0.0)

    run_epochs(stopping, model, [0.80, 0.85, 0.85, 0.84])

    assert (stopping.best_epoch, kept_epoch(model, stopping)) == (2, 2.0)


def test_resumed_counters_stop_where_an_uninterrupted_run_stops():
    accuracies = [0.70, 0.80, 0.803, 0.79, 0.804, 0.81]
    uninterrupted_model, uninterrupted = tiny_model(), ResumableEarlyStopping(patience=3, min_delta=0.005)
    expected = run_epochs(uninterrupted, uninterrupted_model, accuracies)

    model, first = tiny_model(), ResumableEarlyStopping(patience=3, min_delta=0.005)
    run_epochs(first, model, accuracies[:3])
    resumed = ResumableEarlyStopping(patience=3, min_delta=0.005)
    resumed.resume(first.state(), first.best_weights)
    rest = run_epochs(resumed, model, accuracies[3:], first_epoch=3)

    assert expected == [0, 1, 2, 3, 4] and rest == [3, 4]
    assert resumed.state() == uninterrupted.state()
    assert kept_epoch(model, resumed) == kept_epoch(uninterrupted_model, uninterrupted) == 4.0


def test_a_checkpoint_without_a_reference_resumes_from_its_best():
    model, stopping = tiny_model(), ResumableEarlyStopping(patience=2, min_delta=0.01)
    stopping.resume({"wait": 1, "best": 0.9, "best_epoch": 3, "stopped_epoch": 0}, None)
    stopping.set_model(model)

    stopping.on_epoch_end(5, {"val_accuracy": 0.905})

    assert stopping.reference == 0.9 and stopping.stopped_epoch == 5 and stopping.best_epoch == 5
