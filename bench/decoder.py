"""The one decoder (tasks/images.py) against the decode it replaced, on the demo data, in one run.

Fashion-MNIST through the pipeline's own acquire (`idx://fashion_mnist`), the
first N files of its test split (28 px grayscale PNGs). Measures, in images/s:

- ingestion: before, subsample decoded each file with tf.data
  (`tf.io.decode_image`, parallel) only to check it and stored the original
  bytes; now it reads, checks the header, decodes with `to_rgb` and stores a
  canonical PNG (threads): `subsample._ingest`; a file that already is
  the canonical PNG (`images.is_plain_png`, as every Fashion-MNIST file) is
  stored as it is and once, not again as the original;
- the training/evaluation input pipeline at the default image size: before,
  `decode_image` of the original + bilinear resize; now `decode_canonical` of
  the stored PNG + `images.resize` (`records.image_dataset`);
- scoring one new file at a time (`images.decode`) and a batch through the
  SavedModel's in-graph decoder (`decode_in_graph`);

and the largest pixel difference between the old and new input pipeline.

Then phone photos (`--photos`, 12 megapixels, 4000 x 3000 JPEGs of quality 90,
made here): seconds an image to ingest and to read back at the default size,
and megabytes an image in the split file, with the decoder's reduction
(`images.REDUCED_SIDE`) and without it (`photo_before_*`, the decoder before).
Ends with one JSON line.

    python bench/decoder.py [--images 10000] [--photos 8] [--work .bench-decoder]
"""
from __future__ import annotations

import argparse
import io
import time
from pathlib import Path
from unittest import mock

from bench.json_line import json_line
from tasks.config import RunConfig

BATCH = 64


def rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1)


def old_pipeline(path: Path, image_size: int):
    """The input pipeline before the one decoder: decode_image of the stored original, bilinear resize."""
    import tensorflow as tf

    def decode(record):
        image = tf.io.decode_image(record["original"], channels=3, expand_animations=False)
        return tf.image.resize(image, (image_size, image_size))

    return (tf.data.TFRecordDataset(str(path)).map(_parse_original, num_parallel_calls=tf.data.AUTOTUNE)
            .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(BATCH)
            .prefetch(tf.data.AUTOTUNE))


def _parse_original(serialized):
    import tensorflow as tf

    record = tf.io.parse_single_example(serialized, {"image": tf.io.FixedLenFeature([], tf.string),
                                                     "original": tf.io.FixedLenFeature([], tf.string, b"")})
    # a record leaves the original out when it is the canonical image itself
    return {"original": tf.where(tf.equal(record["original"], b""), record["image"], record["original"])}


def old_ingest_seconds(paths: list[str]) -> float:
    """Subsample's check before: every file read and decoded by tf.data in parallel, errors dropped."""
    import tensorflow as tf

    started = time.perf_counter()
    dataset = (tf.data.Dataset.from_tensor_slices(paths)
               .map(lambda path: tf.shape(tf.io.decode_image(tf.io.read_file(path), channels=3,
                                                             expand_animations=False))[0],
                    num_parallel_calls=tf.data.AUTOTUNE).ignore_errors().batch(1024))
    for _ in dataset:
        pass
    return time.perf_counter() - started


def drain(dataset) -> tuple[int, float]:
    started = time.perf_counter()
    count = sum(int(batch[0].shape[0]) if isinstance(batch, tuple) else int(batch.shape[0]) for batch in dataset)
    return count, time.perf_counter() - started


def photo(seed: int) -> bytes:
    """A 4000 x 3000 JPEG (quality 90) of gradients and sensor-like noise: 4.4 MB, as a phone's."""
    import numpy as np
    from PIL import Image

    rows, columns = np.mgrid[0:3000, 0:4000]
    noise = np.random.default_rng(seed).normal(0, 12, (3000, 4000, 3))
    pixels = np.stack([columns / 4000 * 255, rows / 3000 * 255, (rows + columns) % 256], axis=-1) + noise
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def photo_costs(folder: Path, scratch: Path, image_size: int) -> dict[str, float]:
    """(ingest s, split-file MB, read s) an image for the photos in `folder`, through subsample and tf.data."""
    from tasks import records
    from tasks.steps import subsample

    files = sorted(path.name for path in folder.glob("*.jpg"))
    started = time.perf_counter()
    kept, skipped = subsample._ingest(folder, {"train": [(path, 0) for path in files], "val": [], "test": []},
                                      ["all"], scratch)
    ingest_s = time.perf_counter() - started
    assert not skipped and len(kept["train"]) == len(files)
    split = scratch / "train.tfrecord"
    count, read_s = drain(records.image_dataset(split, image_size, BATCH))
    return {"ingest_s": round(ingest_s / count, 3), "record_mb": round(split.stat().st_size / count / 1e6, 2),
            "read_s": round(read_s / count, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--photos", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path(".bench-decoder"))
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    from tasks import images, records
    from tasks.datasets import read_acquired
    from tasks.scratch import scratch_dir
    from tasks.steps import subsample
    from tasks.steps.acquire import acquire

    cfg = RunConfig(source="idx://fashion_mnist", run_root=str(args.work.resolve() / "runs"),
                    image_size=96)  # the demo's size (image_size auto decides after subsample)
    folder = read_acquired(cfg, acquire(cfg))
    files = [path for per_class in folder.files["test"] for path in per_class]
    files = sorted(files)[:args.images]
    selection = {"train": [(path, 0) for path in files], "val": [], "test": []}
    result: dict = {"images": len(files), "image_size": cfg.image_size, "decoder_version": images.DECODER_VERSION}

    old_s = old_ingest_seconds([str(folder.root / path) for path in files])
    with scratch_dir("bench-decoder") as scratch:
        started = time.perf_counter()
        kept, skipped = subsample._ingest(folder.root, selection, ["all"], scratch)
        new_s = time.perf_counter() - started
        assert not skipped and len(kept["train"]) == len(files)
        split = scratch / "train.tfrecord"
        result.update(ingest_before_images_per_s=rate(len(files), old_s),
                      ingest_after_images_per_s=rate(len(files), new_s),
                      stored_bytes_per_image_original=round(sum((folder.root / p).stat().st_size for p in files)
                                                            / len(files), 1),
                      stored_bytes_per_image_record=round(split.stat().st_size / len(files), 1))

        for name, dataset in (("before", old_pipeline(split, cfg.image_size)),
                              ("after", records.image_dataset(split, cfg.image_size, BATCH))):
            drain(dataset)  # warm: traced, file cached
            count, seconds = drain(dataset)
            result[f"pipeline_{name}_images_per_s"] = rate(count, seconds)
        before = np.concatenate([batch.numpy() for batch in old_pipeline(split, cfg.image_size).take(20)])
        after = np.concatenate([batch.numpy() for batch, _ in records.image_dataset(split, cfg.image_size,
                                                                                   BATCH).take(20)])
        result["pipeline_max_pixel_difference"] = float(np.abs(before - after).max())

        originals = [(folder.root / path).read_bytes() for path in files[:2000]]
        started = time.perf_counter()
        for data in originals:
            images.decode(data, cfg.image_size)
        result["decode_one_at_a_time_images_per_s"] = rate(len(originals), time.perf_counter() - started)

        graph = tf.function(lambda batch: tf.map_fn(lambda one: images.decode_in_graph(one, cfg.image_size), batch,
                                                    fn_output_signature=tf.float32))
        batches = [tf.constant(originals[start:start + BATCH]) for start in range(0, len(originals), BATCH)]
        graph(batches[0])
        started = time.perf_counter()
        for batch in batches:
            graph(batch)
        result["in_graph_decode_images_per_s"] = rate(len(originals), time.perf_counter() - started)

    with scratch_dir("bench-photos") as scratch:
        photos = scratch / "photos"
        photos.mkdir()
        for index in range(args.photos):
            (photos / f"{index}.jpg").write_bytes(photo(index))
        result["photo_jpeg_mb"] = round(sum(path.stat().st_size for path in photos.iterdir()) / args.photos / 1e6, 2)
        for when, reduced in (("before", lambda pixels: pixels), ("after", images._reduced)):
            (scratch / when).mkdir()
            with mock.patch.object(images, "_reduced", reduced):
                costs = photo_costs(photos, scratch / when, cfg.image_size)
            result.update({f"photo_{when}_{key}": value for key, value in costs.items()})
    print(json_line(result))


if __name__ == "__main__":
    main()
