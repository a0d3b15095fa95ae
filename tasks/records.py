"""The on-disk form of a subsampled split: one TFRecord file of encoded images.

Subsample writes `data/<split>.tfrecord` under the run root; train, fine-tune and
evaluate read it back as a streaming tf.data pipeline (parallel decode,
prefetch), so no step ever holds a whole dataset in memory and no step depends
on the machine that acquired the source. Each record keeps the original encoded
bytes (the report shows them as thumbnails), the integer label and the image's
path relative to the dataset root.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

SPLITS = ("train", "val", "test")
SHUFFLE_BUFFER = 10_000  # larger than most subsampled splits: an epoch's order is then a full permutation


def write_records(path: str | Path, examples: Iterable[tuple[bytes, int, str]]) -> int:
    """Write (encoded image, label, relative path) triples; returns how many."""
    import tensorflow as tf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    tmp = path.with_name(f".{path.name}.tmp")
    with tf.io.TFRecordWriter(str(tmp)) as writer:
        for image, label, rel_path in examples:
            feature = {
                "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
                "path": tf.train.Feature(bytes_list=tf.train.BytesList(value=[rel_path.encode("utf-8")])),
            }
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
            count += 1
    tmp.replace(path)
    return count


def _parse(serialized):
    import tensorflow as tf

    spec = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "path": tf.io.FixedLenFeature([], tf.string),
    }
    return tf.io.parse_single_example(serialized, spec)


def decode_image(encoded, image_size: int):
    """Encoded bytes -> float32 RGB in [0, 255], resized to image_size x image_size."""
    import tensorflow as tf

    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image = tf.image.resize(image, (image_size, image_size))
    image.set_shape((image_size, image_size, 3))
    return image


def image_dataset(path: str | Path, image_size: int, batch_size: int, *, shuffle_seed: int | None = None,
                  with_paths: bool = False):
    """Batched (image, label) — or (image, label, path) — from one split file.

    Images are float32 in [0, 255]; the backbone model applies its own
    preprocessing, so the composed model also takes raw pixels.
    """
    import tensorflow as tf

    dataset = tf.data.TFRecordDataset(str(path))
    if shuffle_seed is not None:
        dataset = epoch_order(dataset, shuffle_seed)
    dataset = dataset.map(_parse, num_parallel_calls=tf.data.AUTOTUNE)

    def to_example(record):
        image = decode_image(record["image"], image_size)
        if with_paths:
            return image, record["label"], record["path"]
        return image, record["label"]

    dataset = dataset.map(to_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def epoch_order(dataset, shuffle_seed: int):
    """`dataset` (one element per record, in file order) shuffled as one epoch with this seed.

    The order depends only on the number of elements and the seed, never on their
    content: anything stored one element per record (cached activations, or just
    record indices) shuffled here comes out in the same order as the images.
    """
    return dataset.shuffle(SHUFFLE_BUFFER, seed=shuffle_seed, reshuffle_each_iteration=True)


def iter_records(path: str | Path) -> Iterator[tuple[bytes, int, str]]:
    """The raw (encoded image, label, relative path) triples, in file order."""
    import tensorflow as tf

    for serialized in tf.data.TFRecordDataset(str(path)):
        record = _parse(serialized)
        yield record["image"].numpy(), int(record["label"].numpy()), record["path"].numpy().decode("utf-8")
