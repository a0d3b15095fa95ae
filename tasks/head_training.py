"""Training on cached activations, without Keras' fit: a head on features, or fine-tuning's top and head on
boundary activations.

A head on features is a dropout and one dense layer: a batch costs a fraction
of a millisecond of arithmetic. Keras' fit spent about as long again around
each batch (its tf.data iterator, data adapter and metric objects), validated
through a fresh iterator every epoch, and traced its train and test functions
on its first epoch: about 2.5 s for the demo's 10 epochs, on top of a 17 s
backbone pass. Here each epoch's rows are gathered from the memory-mapped cache
in the epoch's order (the image pipeline's, as CachedSplit.batches gives it) and
trained on in calls of up to BATCHES_PER_CALL batches, each batch a plain step:
forward, loss, gradients, the compiled optimizer. The two traced functions can
be traced ahead (HeadSteps.trace), on another thread while the backbone
computes the features.

The batches, their order, the optimizer, the dropout draws and the mixup blends
are those fit would have used, so the weights at each epoch's end are fit's
(tests/test_head_training.py), and the callbacks (early stopping, checkpoints,
TensorBoard) get the same logs: loss and accuracy, the mean over the epoch's
examples, and their val_ counterparts.

Fine-tuning's top on boundary activations (tasks/steps/fine_tune.py) runs the
same way, in calls of fewer batches (a batch there is a backbone's top: tenths
of a second): what it gains is the tracing and graph optimisation of its train
and validation functions, about ten seconds for Lite0's top, done beside the
pass that caches the activations instead of in the first epoch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import keras
import numpy as np

from tasks.activation_cache import CachedSplit
from tasks.training import Feed

# A call into TensorFlow defers Python's signal handlers (Airflow's SIGTERM) until it returns; 256 batches of a head
# are well under a second, and the rows they gather (256 x 64 x 1280 floats: 84 MB) bound the memory a call takes.
BATCHES_PER_CALL = 256


class HeadSteps:
    """The traced functions that train `head` (compiled: its optimizer is used) on cached rows and score it;
    `head` is any model from those rows to probabilities (fine-tuning's top and head too). Each call into
    TensorFlow takes up to `batches_per_call` batches."""

    def __init__(self, head: keras.Model, loss, feed: Feed, mixup: float, batches_per_call: int = BATCHES_PER_CALL):
        import tensorflow as tf

        self.head, self.loss, self.feed, self.mixup = head, loss, feed, mixup
        self.batches_per_call = batches_per_call
        rows = tf.TensorSpec((None, *head.input_shape[1:]), tf.float32)
        labels, scalar = tf.TensorSpec((None,), tf.int64), tf.TensorSpec((), tf.int64)
        self.train = tf.function(self._train, input_signature=[rows, labels, scalar, scalar])
        self.evaluate = tf.function(self._evaluate, input_signature=[rows, labels])

    def trace(self) -> None:
        """Build the optimizer's state, trace both functions and run each once (TensorFlow optimises a function's
        graph on its first run: a third of a second for a head), so that the first epoch waits for none of it.
        Training runs on no rows (no step, no update); scoring on one row of zeros, which changes nothing either
        (oneDNN's fused BatchNorm refuses an empty batch)."""
        self.head.optimizer.build(self.head.trainable_variables)
        shape = self.head.input_shape[1:]
        self.train(np.zeros((0, *shape), np.float32), np.zeros(0, np.int64), np.int64(0), np.int64(0))
        self.evaluate(np.zeros((1, *shape), np.float32), np.zeros(1, np.int64))

    def _train(self, rows, labels, first_batch, mix_seed):
        """One optimizer step per batch of `rows` (batch `first_batch` onwards of the epoch mixed with `mix_seed`);
        returns the sum over the rows of the batch losses and of the hits."""
        import tensorflow as tf

        size = self.feed.batch_size
        variables = self.head.trainable_variables
        loss_sum, hits = tf.constant(0.0), tf.constant(0.0)
        for index in tf.range((tf.shape(rows, out_type=tf.int64)[0] + size - 1) // size):
            x, y = rows[index * size:(index + 1) * size], self._targets(labels[index * size:(index + 1) * size])
            if self.mixup:
                x, y = mix(x, y, self.mixup, tf.stack([mix_seed, first_batch + index]))
            with tf.GradientTape() as tape:
                probabilities = self.head(x, training=True)
                loss = tf.reduce_mean(self.loss(y, probabilities))
            self.head.optimizer.apply(tape.gradient(loss, variables), variables)
            loss_sum += loss * tf.cast(tf.shape(x)[0], tf.float32)
            hits += self._hits(y, probabilities)
        return loss_sum, hits

    def _evaluate(self, rows, labels):
        """The sum over `rows` of the loss and of the hits, in inference mode."""
        import tensorflow as tf

        y = self._targets(labels)
        probabilities = self.head(rows, training=False)
        return tf.reduce_mean(self.loss(y, probabilities)) * tf.cast(tf.shape(rows)[0], tf.float32), \
            self._hits(y, probabilities)

    def _targets(self, labels):
        import tensorflow as tf

        return tf.one_hot(labels, self.feed.num_classes) if self.feed.one_hot else labels

    def _hits(self, y, probabilities):
        """Keras' "accuracy" for these targets: the class of the highest probability against the label (for
        one-hot or blended targets, the class of the largest share)."""
        import tensorflow as tf

        truth = tf.argmax(y, axis=-1) if self.feed.one_hot else y
        return tf.reduce_sum(tf.cast(tf.equal(truth, tf.argmax(probabilities, axis=-1)), tf.float32))


@dataclass(frozen=True)
class HeadEpochs:
    """Epochs over cached train and validation rows (what fit_resumable runs)."""

    steps: HeadSteps
    train: CachedSplit
    val: CachedSplit

    def run(self, model: keras.Model, first: int, last: int, callbacks: list[keras.callbacks.Callback]) -> None:
        """Epochs [first, last) with the callbacks called as fit calls them, until one sets model.stop_training."""
        callback_list = keras.callbacks.CallbackList(callbacks, model=model)
        model.stop_training = False
        callback_list.on_train_begin()
        for epoch in range(first, last):
            callback_list.on_epoch_begin(epoch)
            loss, accuracy = self._epoch(epoch)
            val_loss, val_accuracy = self._validation()
            callback_list.on_epoch_end(epoch, {"loss": loss, "accuracy": accuracy, "val_loss": val_loss,
                                               "val_accuracy": val_accuracy})
            if model.stop_training:
                break
        callback_list.on_train_end()

    def _epoch(self, epoch: int) -> tuple[float, float]:
        seed = self.steps.feed.epoch_seed(epoch)
        order = self.train.order(seed)
        return _means((self.steps.train(self.train.activations[indices], self.train.labels[indices],
                                        np.int64(start // self.steps.feed.batch_size), np.int64(seed))
                       for start, indices in self._calls(order)), len(order))

    def _validation(self) -> tuple[float, float]:
        return _means((self.steps.evaluate(self.val.activations[indices], self.val.labels[indices])
                       for _, indices in self._calls(np.arange(len(self.val)))), len(self.val))

    def _calls(self, order: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, row indices) of each call into TensorFlow: `batches_per_call` batches of `order` at a time."""
        rows = self.steps.batches_per_call * self.steps.feed.batch_size
        return ((start, order[start:start + rows]) for start in range(0, len(order), rows))


def _means(calls: Iterable[tuple[Any, Any]], count: int) -> tuple[float, float]:
    """(mean loss, accuracy) over `count` rows from each call's (loss sum, hits)."""
    loss_sum = hits = 0.0
    for call_loss, call_hits in calls:
        loss_sum, hits = loss_sum + float(call_loss), hits + float(call_hits)
    return loss_sum / count, hits / count


def mix(x, y, alpha: float, key):
    """Mixup of one batch of (features, one-hot labels): each example becomes lam * itself + (1 - lam) * another
    example of its batch, features and labels alike, lam ~ Beta(alpha, alpha) per example; the same `key` (the
    epoch's seed, the batch's index in it) mixes the same way, so a resumed epoch repeats an uninterrupted one."""
    import tensorflow as tf

    size = tf.shape(x)[0]
    gammas = tf.random.stateless_gamma([2, size], seed=key, alpha=alpha)
    lam = gammas[0] / (gammas[0] + gammas[1])
    partner = tf.argsort(tf.random.stateless_uniform([size], seed=key + 1))
    lam_x = tf.reshape(tf.cast(lam, x.dtype), [-1] + [1] * (len(x.shape) - 1))
    lam_y = tf.reshape(tf.cast(lam, y.dtype), [-1, 1])
    return lam_x * x + (1 - lam_x) * tf.gather(x, partner), lam_y * y + (1 - lam_y) * tf.gather(y, partner)
