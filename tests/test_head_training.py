"""The own training loop on cached rows (a head on features, fine-tuning's top and head on boundary activations):
the very weights and logs of Keras' fit, faster."""
from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from tasks.activation_cache import CachedSplit
from tasks.training import Feed

CLASSES, FEATURES = 3, 16
BOUNDARY = (4, 4, 3)  # boundary activations of a small "backbone top"


def splits(shape: tuple[int, ...] = (FEATURES,)) -> dict[str, CachedSplit]:
    """90 training rows (12 batches of 8, the last of 2) and 20 validation rows, labels tied to the rows."""
    rng = np.random.default_rng(0)
    def split(count: int) -> CachedSplit:
        rows = rng.normal(size=(count, *shape)).astype("float32")
        return CachedSplit(rows, (rows.reshape(count, -1)[:, :CLASSES].argmax(axis=1)).astype(np.int64))
    return {"train": split(90), "val": split(20)}


def head():
    from tasks.head import build_head

    return build_head((FEATURES,), CLASSES, 0.2)


def top_and_head():
    """What fine-tuning trains on boundary activations: a top called in inference mode, whose BatchNorm and
    depthwise kernels are frozen under a trained 1x1 convolution, then the head."""
    import keras

    from tasks.head import build_head

    boundary = keras.Input(BOUNDARY)
    x = keras.layers.DepthwiseConv2D(3, padding="same", trainable=False)(boundary)
    x = keras.layers.BatchNormalization(trainable=False)(x)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 1, activation="relu6")(x))
    top = keras.Model(boundary, x)
    rows = keras.Input(BOUNDARY)
    return keras.Model(rows, build_head((8,), CLASSES, 0.2)(top(rows, training=False)))


def feed(one_hot: bool) -> Feed:
    return Feed(image_size=0, batch_size=8, seed=3, num_classes=CLASSES, one_hot=one_hot)


def trained(epochs_of, loss_name: str, one_hot: bool, epochs: int = 3, callbacks: tuple = (),
            build=head) -> list[tuple[list[np.ndarray], dict]]:
    """(weights, logs) at each epoch's end of a fresh seeded model (`build()`, the head by default) trained by
    `epochs_of(model, loss, feed)`."""
    import keras

    from tasks.training import compile_model, resolve_loss

    keras.utils.set_random_seed(1)
    head = build()
    loss = resolve_loss(loss_name)
    compile_model(head, "adam", loss, 1e-2, SimpleNamespace(model=head))
    ends = []
    record = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: ends.append((head.get_weights(),
                                                                                          dict(logs))))
    epochs_of(head, loss, feed(one_hot)).run(head, 0, epochs, [record, *callbacks])
    return ends


def head_epochs(mixup: float = 0.0, batches_per_call: int | None = None, rows: tuple[int, ...] = (FEATURES,)):
    from tasks.head_training import BATCHES_PER_CALL, HeadEpochs, HeadSteps

    def epochs_of(head, loss, shape):
        cached = splits(rows)
        return HeadEpochs(HeadSteps(head, loss, shape, mixup, batches_per_call or BATCHES_PER_CALL), cached["train"],
                          cached["val"])
    return epochs_of


def keras_epochs(mixup: float = 0.0, rows: tuple[int, ...] = (FEATURES,)):
    """Keras' fit over the cached epochs, each batch mixed as the head's loop mixes it (the epoch's seed, the
    batch's index in the epoch)."""
    import tensorflow as tf

    from tasks.checkpoints import KerasEpochs
    from tasks.head_training import mix
    from tasks.training import cached_epochs

    def epochs_of(head, loss, shape):
        plain = cached_epochs(shape, splits(rows))
        if not mixup:
            return plain

        def mixed(epoch):
            key = tf.constant(shape.epoch_seed(epoch), tf.int64)
            return plain.train_epoch(epoch).enumerate().map(
                lambda index, batch: mix(*batch, mixup, tf.stack([key, index])))
        return KerasEpochs(mixed, plain.steps_per_epoch, plain.validation)
    return epochs_of


def assert_same(ours: list, keras_fit: list) -> None:
    assert len(ours) == len(keras_fit) == 3
    for (weights, logs), (keras_weights, keras_logs) in zip(ours, keras_fit, strict=True):
        for mine, theirs in zip(weights, keras_weights, strict=True):
            np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
        assert set(keras_logs) <= set(logs)
        for key, value in keras_logs.items():
            assert logs[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize(("loss", "one_hot"), [("sparse_categorical_crossentropy", False),
                                               ("categorical_crossentropy", True)])
def test_the_head_loop_ends_each_epoch_on_the_weights_and_logs_of_keras_fit(loss, one_hot):
    assert_same(trained(head_epochs(), loss, one_hot), trained(keras_epochs(), loss, one_hot))


def test_the_head_loop_mixes_up_each_batch_as_a_mixed_stream_through_keras_fit_would():
    ours = trained(head_epochs(0.4), "categorical_crossentropy", True)
    assert_same(ours, trained(keras_epochs(0.4), "categorical_crossentropy", True))
    assert not np.allclose(ours[-1][0][0], trained(head_epochs(), "categorical_crossentropy", True)[-1][0][0])


def test_an_epoch_split_into_several_calls_trains_as_one_call():
    whole = trained(head_epochs(0.4), "categorical_crossentropy", True)
    # 12 batches: calls of 5, 5 and 2
    assert_same(trained(head_epochs(0.4, batches_per_call=5), "categorical_crossentropy", True), whole)


def test_fine_tunings_top_and_head_train_as_through_keras_fit():
    """Fine-tuning on cached boundary activations: frozen BatchNorm and depthwise kernels stay as they were, the
    rest ends each epoch where fit ends it, in calls of a few batches."""
    ours = trained(head_epochs(batches_per_call=5, rows=BOUNDARY), "sparse_categorical_crossentropy", False,
                   build=top_and_head)
    assert_same(ours, trained(keras_epochs(rows=BOUNDARY), "sparse_categorical_crossentropy", False,
                              build=top_and_head))
    import keras

    keras.utils.set_random_seed(1)  # as trained() seeds it: the weights before training
    before = top_and_head().get_weights()
    after = ours[-1][0]
    for index in range(6):  # depthwise kernel and bias, BatchNorm gamma, beta, mean and variance
        np.testing.assert_array_equal(after[index], before[index])
    assert not np.allclose(after[6], before[6]), "the 1x1 convolution trains"


def test_functions_traced_on_another_thread_are_the_ones_the_epochs_run():
    from tasks.head import build_head
    from tasks.head_training import HeadEpochs, HeadSteps
    from tasks.training import compile_model, resolve_loss

    head = build_head((FEATURES,), CLASSES, 0.2)
    loss = resolve_loss("sparse_categorical_crossentropy")
    compile_model(head, "adam", loss, 1e-2, SimpleNamespace(model=head))
    steps = HeadSteps(head, loss, feed(False), 0.0)
    tracer = threading.Thread(target=steps.trace)
    tracer.start()
    tracer.join()
    cached = splits()
    HeadEpochs(steps, cached["train"], cached["val"]).run(head, 0, 2, [])
    assert steps.train.experimental_get_tracing_count() == 1
    assert steps.evaluate.experimental_get_tracing_count() == 1
    assert int(head.optimizer.iterations.numpy()) == 2 * 12


def test_the_loop_stops_when_a_callback_says_so():
    import keras

    class StopAfterSecond(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                self.model.stop_training = True

    assert len(trained(head_epochs(), "sparse_categorical_crossentropy", False, epochs=5,
                       callbacks=(StopAfterSecond(),))) == 2
