"""The on-disk form of a subsampled split: one TFRecord file of decoded-once images.

Subsample writes `data/<split>.tfrecord` under the run root; train, fine-tune and
evaluate read it back as a streaming tf.data pipeline (parallel decode,
prefetch), so no step ever holds a whole dataset in memory and no step depends
on the machine that acquired the source. Each record holds the image as the one
decoder (tasks.images.to_rgb) made it, stored losslessly (a canonical PNG that
TensorFlow decodes to exactly those pixels), the original file's bytes (what a
client would send to the published model: the serving check sends them; left
out when the file already is the canonical image), the
integer label and the image's path relative to the dataset root.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tasks import images

SPLITS = ("train", "val", "test")
PARSE_BATCH = 512  # records parsed per call by parsed_batches
SHUFFLE_BUFFER = 10_000  # larger than most subsampled splits: an epoch's order is then a full permutation
DECODERS = os.cpu_count() or 1  # records decoded at once
AHEAD = 2  # batches made ready ahead of the consumer


def write_records(path: str | Path, examples: Iterable[tuple[bytes, int, str]]) -> int:
    """Write (encoded image file, label, relative path) triples, each decoded once; returns how many.

    ImageDecodeError for an image the decoder refuses (subsample checks and
    lists them first, then writes with `write_canonical`).
    """
    return write_canonical(path, ((images.canonical_png(original), original, label, rel_path)
                                  for original, label, rel_path in examples))


def write_canonical(path: str | Path, examples: Iterable[tuple[bytes, bytes, int, str]]) -> int:
    """Write (canonical image, original bytes, label, relative path); returns how many.

    The original is left out of a record when it is the canonical image itself
    (`images.is_plain_png`); `originals` then gives the image.
    """
    import tensorflow as tf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    tmp = path.with_name(f".{path.name}.tmp")
    with tf.io.TFRecordWriter(str(tmp)) as writer:
        for image, original, label, rel_path in examples:
            feature = {
                "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
                "path": tf.train.Feature(bytes_list=tf.train.BytesList(value=[rel_path.encode("utf-8")])),
            }
            if original is not image and original != image:  # an original already canonical is stored once
                feature["original"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[original]))
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
            count += 1
    tmp.replace(path)
    return count


def _parse(serialized):
    import tensorflow as tf

    return tf.io.parse_single_example(serialized, _spec())


def _spec() -> dict:
    import tensorflow as tf

    return {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "path": tf.io.FixedLenFeature([], tf.string),
    }


def record_image(encoded, image_size: int):
    """A record's canonical image -> float32 RGB in [0, 255] at image_size: the pixels `images.decode` gives."""
    image = images.resize(images.decode_canonical(encoded), image_size)
    image.set_shape((image_size, image_size, 3))
    return image


def image_dataset(path: str | Path, image_size: int, batch_size: int, *, shuffle_seed: int | None = None,
                  with_paths: bool = False, only: Sequence[int] | None = None):
    """Batched (image, label) — or (image, label, path) — from one split file; `only` those records (indices
    in file order), skipped before they are parsed.

    Images are float32 in [0, 255]; the backbone model applies its own
    preprocessing, so the composed model also takes raw pixels.
    """
    import tensorflow as tf

    dataset = tf.data.TFRecordDataset(str(path))
    if only is not None:
        import numpy as np

        mask = np.zeros(max(only, default=-1) + 1, dtype=bool)
        mask[list(only)] = True
        wanted = tf.constant(mask)
        dataset = dataset.take(len(mask)).enumerate().filter(
            lambda index, _: tf.gather(wanted, index)).map(lambda _, record: record)
    if shuffle_seed is not None:
        dataset = epoch_order(dataset, shuffle_seed)
    dataset = dataset.map(_parse, num_parallel_calls=DECODERS)

    def to_example(record):
        image = record_image(record["image"], image_size)
        if with_paths:
            return image, record["label"], record["path"]
        return image, record["label"]

    dataset = dataset.map(to_example, num_parallel_calls=DECODERS, deterministic=True)
    return steady(dataset.batch(batch_size).prefetch(AHEAD))


def steady(dataset):
    """`dataset` with tf.data's autotuning off (its callers set parallelism and read-ahead themselves).

    The autotuner's background thread held up the deletion of an iterator at
    random: by up to 5 s after a slow consumer's pass over 5,400 images (1 pass in
    8), and by 1.2-2.4 s at the end of a head's training on cached features (2 of
    7 runs; none of 14 without it).
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def epoch_order(dataset, shuffle_seed: int):
    """`dataset` (one element per record, in file order) shuffled as one epoch with this seed.

    The order depends only on the number of elements and the seed, never on their
    content: anything stored one element per record (cached activations, or just
    record indices) shuffled here comes out in the same order as the images.
    """
    return dataset.shuffle(SHUFFLE_BUFFER, seed=shuffle_seed, reshuffle_each_iteration=True)


def iter_records(path: str | Path) -> Iterator[tuple[bytes, int, str]]:
    """The (canonical image, label, relative path) triples, in file order."""
    for batch in parsed_batches(path, _spec()):
        for image, label, rel_path in zip(batch["image"], batch["label"], batch["path"], strict=True):
            yield image, int(label), rel_path.decode("utf-8")


def parsed_batches(path: str | Path, spec: dict) -> Iterator[dict]:
    """The features of `spec` of each record, as numpy arrays of PARSE_BATCH records, in file order (parsing one
    record per eager call took 80 times as long on 10,000 records)."""
    import tensorflow as tf

    return tf.data.TFRecordDataset(str(path)).batch(PARSE_BATCH).map(
        lambda many: tf.io.parse_example(many, spec)).as_numpy_iterator()


def originals(path: str | Path, count: int) -> list[tuple[bytes, str]]:
    """(original file bytes, relative path) of the first `count` records: what a client would have sent."""
    import tensorflow as tf

    spec = {"image": tf.io.FixedLenFeature([], tf.string), "original": tf.io.FixedLenFeature([], tf.string, b""),
            "path": tf.io.FixedLenFeature([], tf.string)}
    return [(record["original"].numpy() or record["image"].numpy(), record["path"].numpy().decode("utf-8"))
            for record in tf.data.TFRecordDataset(str(path)).take(count).map(
                lambda serialized: tf.io.parse_single_example(serialized, spec))]
