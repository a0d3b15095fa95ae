"""Subsample: choose the classes and images a run uses, and pin the choice in a manifest.

Classes are all, the first N in the dataset's class order, or named ones (kept
in the dataset's order, so "steak,pizza" and "pizza,steak" give the same
labels). Per class, train_count images (when > 0) or train_percent of the
class's train images are drawn; val_fraction of those become the validation
split (at least one per class and never all of them: a class with fewer than
two drawn is refused, naming the setting or image count that would do);
test_percent of the class's test images form the test split, which nothing
uses for selection or training. Each class draws from its own generator seeded
by (seed, split, class name), over sorted file lists: the same seed picks the
same images whatever the filesystem order, and adding a class never changes
another's.

Every selected file is checked before it is read (its size against
TLP_MAX_IMAGE_BYTES), before it is decoded (the dimensions its header declares,
parsed by tasks.images itself, against TLP_MAX_IMAGE_PIXELS: a decompression
bomb is never decoded, whatever Pillow thinks of the file), then hashed and
decoded once by the one decoder (tasks.images) in parallel threads, and stored
in the split files as the canonical pixels every later step reads. Files that
fail are listed in the manifest as skipped with the reason, never silently
dropped. The
manifest (every file with label, class, split and sha256; counts; seed; source,
with any credentials redacted; params; skipped; per split the
quartiles of the images' shorter side, width and height, which image_size auto
decides by; one hash of the whole selection) holds no paths or times of the machine that wrote it, so it is
byte-identical for the same inputs and seed.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

from tasks import artifacts, images, records, settings, storage, test_source
from tasks.config import RunConfig
from tasks.datasets import DatasetError, ImageFolder, read_acquired
from tasks.errors import ImageDecodeError
from tasks.redact import redact_uri
from tasks.scratch import scratch_dir

log = logging.getLogger(__name__)

REQUIRED_SPLITS = ("train", "test")
MIN_SELECTED = 2  # train images of a class to carve a validation split from: one for each side
INGEST_CHUNK = 256  # images decoded ahead and held at once
# A chunk whose images average fewer pixels is decoded in the calling thread: for small images Pillow's work is
# mostly Python, and two threads contending for the GIL took 2-2.4 times as long as one (28 px PNGs: 0.19 against
# 0.08 ms an image); from about 128 x 128 its C decoders, which release the GIL, make threads 1.4-1.7 times faster.
THREADED_PIXELS = 128 * 128
MIN_CLASSES = 2

Selection = dict[str, list[tuple[str, int]]]


def subsample(cfg: RunConfig, acquired: dict[str, Any]) -> dict[str, Any]:
    """Select from what acquire indexed, check and write the three split files and the manifest."""
    folder = read_acquired(cfg, acquired)
    source = redact_uri(cfg.source)
    labels = selected_labels(folder, cfg.classes, source)
    classes = [folder.classes[label] for label in labels]
    folder = test_source.with_test_source(cfg, folder, classes)
    root = folder.root
    selection = sample_splits(folder, labels, cfg)
    with scratch_dir("subsample") as scratch:
        sizes: dict[str, list[tuple[int, int]]] = {}
        kept, skipped = _ingest(root, selection, classes, scratch, sizes)
        kept, duplicates = _drop_test_duplicates(kept)
        tallies = {split: Counter(f["class"] for f in files) for split, files in kept.items()}
        counts = {split: {name: tally[name] for name in classes} for split, tally in tallies.items()}
        _require_images(counts, skipped, source)
        for split in records.SPLITS:
            storage.upload(scratch / f"{split}.tfrecord", cfg.artifact(artifacts.split_records(split)))

    manifest = {
        "source": source,
        "source_sha256": storage.read_json(cfg.artifact(artifacts.ACQUIRED))["sha256"],
        "seed": cfg.seed,
        "params": {"classes": list(cfg.classes) if isinstance(cfg.classes, tuple) else cfg.classes,
                   "train_percent": cfg.train_percent, "train_count": cfg.train_count,
                   "val_fraction": cfg.val_fraction, "test_percent": cfg.test_percent},
        "classes": classes,
        "counts": counts,
        "files": [file for split in records.SPLITS for file in kept[split]],
        "skipped": skipped,
        "skipped_names": list(folder.skipped),
        "test_duplicates": duplicates,
        "image_sizes": size_statistics(sizes),
        "hash": selection_hash(kept, redact_uri(cfg.test_source)),
    }
    if cfg.test_source:
        manifest["test_source"] = test_source.manifest_entry(cfg)
    uri = cfg.artifact(artifacts.MANIFEST)
    storage.write_json(uri, manifest)
    totals = {split: len(kept[split]) for split in records.SPLITS}
    log.info("subsampled %s: %d classes, %s, %d skipped, %d test duplicates of train/val removed -> %s (hash %s)",
             source, len(classes), " ".join(f"{split}={n}" for split, n in totals.items()), len(skipped),
             len(duplicates), uri, manifest["hash"][:12])
    return {"manifest": uri, "hash": manifest["hash"], "counts": totals, "n_classes": len(classes),
            "n_skipped": len(skipped), "n_test_duplicates": len(duplicates)}


def selected_labels(folder: ImageFolder, classes: tuple[str, ...] | int | None, source: str) -> list[int]:
    """The dataset labels of the requested classes, in the dataset's class order; at least two.

    One class would train a model that is always right (100 % on any test
    split) and could become a new model's first champion.
    """
    if classes is None:
        labels = list(range(len(folder.classes)))
    elif isinstance(classes, int):
        if not 1 <= classes <= len(folder.classes):
            raise DatasetError(f"classes={classes}, but {source} has {len(folder.classes)} classes; "
                               f"use {MIN_CLASSES}..{len(folder.classes)}")
        labels = list(range(classes))
    else:
        unknown = [name for name in classes if name not in folder.classes]
        if unknown:
            raise DatasetError(f"classes {unknown} are not in {source}; available: {list(folder.classes)}")
        labels = sorted(folder.classes.index(name) for name in classes)
    if len(labels) < MIN_CLASSES:
        raise DatasetError(f"the selection has {len(labels)} class ({[folder.classes[i] for i in labels]} of {source}),"
                           f" but a classifier needs at least {MIN_CLASSES}: select more classes (classes=empty for all"
                           f" {len(folder.classes)}), or add class folders to the dataset")
    return labels


def sample_splits(folder: ImageFolder, labels: list[int], cfg: RunConfig) -> Selection:
    """(path, new label) per split: seeded per-class draws from train (carved into train/val) and test."""
    missing = [split for split in REQUIRED_SPLITS if split not in folder.files]
    if missing:
        raise DatasetError(f"{redact_uri(cfg.source)} has no {missing} split (found {list(folder.files)}); "
                           "the dataset needs train/ and test/ folders")
    selection: Selection = {split: [] for split in records.SPLITS}
    for new_label, label in enumerate(labels):
        name = folder.classes[label]
        train_files = folder.files["train"][label]
        wanted = cfg.train_count or _share(len(train_files), cfg.train_percent)
        if wanted > len(train_files):
            log.warning("train_count=%d but class %r has %d train images; using all of them",
                        wanted, name, len(train_files))
        picked = _draw(train_files, wanted, cfg.seed, "train", name)
        if len(picked) < MIN_SELECTED:
            raise _too_few_to_split(name, len(train_files), len(picked), cfg)
        n_val = _val_count(len(picked), cfg.val_fraction)
        selection["val"] += [(path, new_label) for path in picked[:n_val]]
        selection["train"] += [(path, new_label) for path in picked[n_val:]]
        test_files = folder.files["test"][label]
        selection["test"] += [(path, new_label) for path in
                              _draw(test_files, _share(len(test_files), cfg.test_percent), cfg.seed, "test", name)]
    return {split: sorted(pairs) for split, pairs in selection.items()}


def selection_hash(kept: dict[str, list[dict[str, Any]]], test_source: str = "") -> str:
    """One sha256 over the sorted (split, path, label, file sha256) lines of the whole selection, and the
    test source its test split came from, if another than the source."""
    lines = sorted(f"{f['split']}\t{f['path']}\t{f['label']}\t{f['sha256']}\n"
                   for files in kept.values() for f in files)
    if test_source:
        lines.append(f"test_source\t{test_source}\n")
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def _draw(files: tuple[str, ...], count: int, seed: int, split: str, name: str) -> list[str]:
    import numpy as np

    rng = np.random.default_rng([seed, zlib.crc32(f"{split}/{name}".encode("utf-8"))])
    order = rng.permutation(len(files))[:count]
    return [files[index] for index in order]


def _too_few_to_split(name: str, available: int, picked: int, cfg: RunConfig) -> DatasetError:
    """The error for a class that cannot give one validation and one training image, with fixes that work."""
    if cfg.train_count:
        chosen = f"train_count={cfg.train_count}"
        fixes = ([f"set train_count to at least {MIN_SELECTED}"] if available >= MIN_SELECTED
                 else [f"add {MIN_SELECTED - available} more train images to it"])
    else:
        chosen = f"train_percent={cfg.train_percent:g}"
        needed = _smallest(math.ceil(100 * (MIN_SELECTED - 0.5) / cfg.train_percent),
                           lambda total: _share(total, cfg.train_percent) >= MIN_SELECTED)
        fixes = [f"add {needed - available} more train images to it ({needed} at {chosen})"]
        if available >= MIN_SELECTED:
            percent = _smallest(math.ceil(100 * (MIN_SELECTED - 0.5) / available),
                                lambda percent: _share(available, percent) >= MIN_SELECTED)
            fixes.insert(0, f"set train_percent to at least {percent}")
    return DatasetError(
        f"class {name!r} has {available} train images and {chosen} selects {picked}, but a validation split needs "
        f"at least {MIN_SELECTED} selected (at val_fraction={cfg.val_fraction:g}: 1 for validation, the rest for "
        f"training): {', '.join(fixes)}, or drop the class")


def _smallest(start: int, works: Callable[[int], bool]) -> int:
    """The first whole number from `start` on that works (`start` is the exact bound, rounded up)."""
    while not works(start):
        start += 1
    return start


def _share(total: int, percent: float) -> int:
    """percent of total, rounded half up, at least 1 when there is anything."""
    return max(1, int(total * percent / 100 + 0.5)) if total else 0


def _val_count(selected: int, fraction: float) -> int:
    """Validation images of a class: at least 1 when it has 2+, and never all of them."""
    if selected < 2:
        return 0
    return min(selected - 1, max(1, int(selected * fraction + 0.5)))


def _ingest(root: Path, selection: Selection, classes: list[str], scratch: Path,
            sizes: dict[str, list[tuple[int, int]]] | None = None) -> tuple[dict, list[dict[str, Any]]]:
    """Check, hash and decode every selected file once; write the kept ones to scratch/<split>.tfrecord.
    `sizes`, when given, gets each kept file's (width, height) as its header declares, per split.

    Files are read and their headers checked here; threads decode a chunk of
    large images in parallel (Pillow and zlib release the GIL), a chunk of small
    ones is decoded here (THREADED_PIXELS). Chunks bound memory to two of them,
    not a split: the next chunk is decoded (or submitted) while this one is
    written. Records keep selection order.
    A test image byte-identical to a train or validation image is kept in the
    returned selection (for _drop_test_duplicates to list) but not written.
    """
    limits = settings.load().limits
    kept: dict[str, list[dict[str, Any]]] = {split: [] for split in records.SPLITS}
    skipped = []
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        def read(chunk: list[dict[str, Any]]) -> Iterable[tuple[bytes, bytes, tuple[int, int]] | str]:
            opened = [_open_image(root / entry["path"], limits) for entry in chunk]
            if _threaded(opened):
                return pool.map(lambda entry: _canonical(entry, limits), opened)  # submitted at once
            return [_canonical(entry, limits) for entry in opened]

        for split in records.SPLITS:
            entries = [{"split": split, "path": path, "label": label, "class": classes[label]}
                       for path, label in selection[split]]
            seen = {f["sha256"] for done in ("train", "val") if split == "test" for f in kept[done]}

            def stored(split: str, entries: list[dict[str, Any]], seen: set[str]):
                chunks = [entries[start:start + INGEST_CHUNK] for start in range(0, len(entries), INGEST_CHUNK)]
                ahead = read(chunks[0]) if chunks else None
                for index, chunk in enumerate(chunks):
                    # the next chunk is read here and decoded (by the threads while this one is hashed and written)
                    results, ahead = ahead, read(chunks[index + 1]) if index + 1 < len(chunks) else None
                    for entry, result in zip(chunk, results, strict=True):
                        if isinstance(result, str):
                            skipped.append({**entry, "reason": result})
                            continue
                        image, original, size = result
                        sha256 = hashlib.sha256(original).hexdigest()
                        kept[split].append({**entry, "sha256": sha256})
                        if sizes is not None:
                            sizes.setdefault(split, []).append(size)
                        if sha256 not in seen:
                            yield image, original, entry["label"], entry["path"]

            records.write_canonical(scratch / f"{split}.tfrecord", stored(split, entries, seen))
    if skipped:
        log.warning("skipped %d unreadable images, e.g. %s: %s", len(skipped), skipped[0]["path"],
                    skipped[0]["reason"])
    return kept, skipped


def size_statistics(sizes: dict[str, list[tuple[int, int]]]) -> dict[str, dict[str, Any]]:
    """Per split: how many images, and the quartiles of their shorter side, width and height in pixels (as the
    files' headers declare them): what image_size auto decides by (tasks.config.auto_image_size)."""
    import numpy as np

    def quartiles(values: list[int]) -> dict[str, float]:
        low, p25, median, p75, high = np.percentile(values, [0, 25, 50, 75, 100])
        return {"min": float(low), "p25": float(p25), "median": float(median), "p75": float(p75), "max": float(high)}

    return {split: {"images": len(pairs), "short_side": quartiles([min(pair) for pair in pairs]),
                    "width": quartiles([pair[0] for pair in pairs]), "height": quartiles([pair[1] for pair in pairs])}
            for split, pairs in sizes.items() if pairs}


def _drop_test_duplicates(kept: dict[str, list[dict[str, Any]]]) -> tuple[dict, list[dict[str, Any]]]:
    """Remove the test images byte-identical to a train or validation image: a model is not tested on what it saw.

    Returns the kept selection and the removed images, each with the path of
    the train/val image it repeats.
    """
    seen = {f["sha256"]: f["path"] for split in ("train", "val") for f in kept[split]}
    duplicates = [{"path": f["path"], "class": f["class"], "same_as": seen[f["sha256"]]}
                  for f in kept["test"] if f["sha256"] in seen]
    if duplicates:
        log.warning("removed %d test images identical to train/val images, e.g. %s = %s", len(duplicates),
                    duplicates[0]["path"], duplicates[0]["same_as"])
    return {**kept, "test": [f for f in kept["test"] if f["sha256"] not in seen]}, duplicates


def _open_image(path: Path, limits: settings.Limits) -> tuple[bytes, tuple[int, int]] | str:
    """(original bytes, (width, height) its header declares) of one file, or why it is skipped.

    The byte limit holds before the file is read, the pixel limit before it is
    decoded: a few kilobytes of PNG can declare 100,000 x 100,000 pixels, and
    the header is parsed by tasks.images itself, so a file Pillow would refuse to
    judge (a bad CRC in a text chunk) is measured all the same.
    """
    try:
        size = path.stat().st_size
        over = limits.exceeded("max_image_bytes", size)
        if over:
            return f"too large: {size:,} bytes, {over}"
        with path.open("rb") as file:
            original = file.read(limits.max_image_bytes + 1)
    except OSError as error:
        return f"unreadable: {error.strerror or error}"
    if len(original) > limits.max_image_bytes:  # it grew after stat
        return f"too large: {limits.exceeded('max_image_bytes', len(original))}"
    try:
        width, height = images.header_size(original)
    except ImageDecodeError as error:
        return f"not a decodable image: {error}"
    over = limits.exceeded("max_image_pixels", width * height)
    if over:
        return f"decompression bomb: {width}x{height} pixels, {over}"
    return original, (width, height)


def _canonical(opened: tuple[bytes, tuple[int, int]] | str, limits: settings.Limits
               ) -> tuple[bytes, bytes, tuple[int, int]] | str:
    """(canonical image, original bytes, declared size) of an opened file, or why it is skipped."""
    if isinstance(opened, str):
        return opened
    original, size = opened
    try:
        return images.canonical_png(original, max_pixels=limits.max_image_pixels), original, size
    except ImageDecodeError as error:
        return f"not a decodable image: {error}"


def _threaded(opened: list[tuple[bytes, tuple[int, int]] | str]) -> bool:
    """Whether a chunk's images are large enough on average for decoding threads to pay (THREADED_PIXELS)."""
    pixels = [math.prod(entry[1]) for entry in opened if not isinstance(entry, str)]
    return bool(pixels) and sum(pixels) >= THREADED_PIXELS * len(pixels)


def _require_images(counts: dict[str, dict[str, int]], skipped: list[dict[str, Any]], source: str) -> None:
    """Every selected class needs at least one usable image in every split."""
    for split, per_class in counts.items():
        for name, count in per_class.items():
            if count:
                continue
            reasons = [f"{s['path']}: {s['reason']}" for s in skipped if s["split"] == split and s["class"] == name]
            detail = f" ({len(reasons)} skipped, e.g. {reasons[0]})" if reasons else ""
            raise DatasetError(f"class {name!r} has no usable images in the {split} split of {source}{detail}; "
                               "raise train_percent/train_count or test_percent, fix the images, or drop the class")
