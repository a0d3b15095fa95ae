"""The published SavedModel: one classifier, two ways in.

- `serving_default` takes float32 pixels [batch, size, size, 3] in [0, 255], as
  tasks.images decodes and resizes them (what TFLite is converted from and the
  champion is re-scored through).
- `serve_bytes` takes a batch of encoded image files (tf.string [batch]) and
  returns `probabilities` [batch, classes] and `labels` (the top class's name)
  [batch]: it decodes in the graph (tasks.images.decode_in_graph) what
  TensorFlow can. What it cannot (EXIF orientation, a GIF's transparency or a
  first frame smaller than its screen, an animated WebP without alpha, a BMP of
  palette, 16-bit or compressed pixels) a client does first:
  tasks.images.client_bytes, stated in the model card and the README.
- `serve_embeddings` takes the pixels `serving_default` takes and returns
  `probabilities` and `embeddings` [batch, features]: what the head's dense layer
  sees (the pooled backbone features), from one pass. Batch scoring compares a
  scored batch's embeddings with a sample of the training images' (tasks.embedding_reference).
"""
from __future__ import annotations

from pathlib import Path

from tasks import images

PIXELS_SIGNATURE = "serving_default"
BYTES_SIGNATURE = "serve_bytes"
BYTES_INPUT = "images"
EMBEDDINGS_SIGNATURE = "serve_embeddings"
PIXELS_INPUT = "image"


def with_embeddings(model):
    """A function from a pixel batch to {"probabilities", "embeddings"}, the backbone run once: the embeddings
    are the input of the head's dense layer (tasks/head.py), the probabilities exactly what `model` answers.
    A model not built by tasks.classifier gives the input of its last layer."""
    import keras

    from tasks.head import HEAD_NAME

    if HEAD_NAME not in [layer.name for layer in model.layers]:
        two = keras.Model(model.inputs, [model.outputs[0], model.layers[-1].input])

        def last_layer(image):
            probabilities, embeddings = two(image, training=False)
            return {"probabilities": probabilities, "embeddings": embeddings}

        return last_layer
    head = model.get_layer(HEAD_NAME)
    body = model.layers[model.layers.index(head) - 1]  # compose(): image -> backbone -> head
    features = keras.Model(head.input, head.get_layer("probabilities").input)

    def both(image):
        backbone = body(image, training=False)
        return {"probabilities": head(backbone, training=False), "embeddings": features(backbone, training=False)}

    return both


def export(model, classes: tuple[str, ...], directory: Path) -> Path:
    """Write `model` (raw pixels in, probabilities out) as a SavedModel with its three signatures into `directory`.

    The signatures are saved with a plain tf.Module holding the variables they read, not through Keras'
    ExportArchive, which walks and saves the whole Keras object graph looking for resources a classifier does not
    have, and keeps its functions as attributes that tf.saved_model.save traces a second time: Lite0 exported in
    5.9 s instead of 9.2. The signatures are the archive's: `serve` and `serving_default` (pixels), `serve_bytes`,
    `serve_embeddings`.
    """
    import tensorflow as tf

    size = int(model.input_shape[1])
    names = list(classes)
    pixels = tf.TensorSpec((None, size, size, 3), tf.float32, name=PIXELS_INPUT)

    def from_bytes(encoded):
        decoded = tf.map_fn(lambda one: images.decode_in_graph(one, size), encoded,
                            fn_output_signature=tf.TensorSpec((size, size, 3), tf.float32))
        probabilities = model(decoded, training=False)
        return {"probabilities": probabilities,
                "labels": tf.gather(tf.constant(names), tf.argmax(probabilities, axis=-1))}

    serve = tf.function(lambda image: model(image, training=False), input_signature=[pixels]).get_concrete_function()
    signatures = {
        "serve": serve, PIXELS_SIGNATURE: serve,
        EMBEDDINGS_SIGNATURE: tf.function(with_embeddings(model), input_signature=[pixels]).get_concrete_function(),
        BYTES_SIGNATURE: tf.function(from_bytes, input_signature=[tf.TensorSpec((None,), tf.string, name=BYTES_INPUT)]
                                     ).get_concrete_function()}
    module = tf.Module()  # the variables the signatures read: what the SavedModel's checkpoint must hold
    module.variables_read = list({id(variable): variable for function in signatures.values()
                                  for variable in function.variables}.values())
    tf.saved_model.save(module, str(directory), signatures=signatures)
    return directory
