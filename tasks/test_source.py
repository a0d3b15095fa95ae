"""A test split from a source of its own: test on images from elsewhere than the training images.

Validation is carved out of the training source, so it says how the model does
on more images like the training images. When the images users will send come
from elsewhere (another camera, supplier, style), the honest estimate is a test
split from there: the `test_source` param. It is any source `source` accepts
(tasks.datasets), laid out as `test/<class>/<image>` (other splits in it are
ignored), fetched, limited and cached like `source`, and indexed by acquire
beside it. Subsample then draws the test split from it instead of the
source's test split, with the same per-class draw, checks and duplicate
removal; its paths ("test/<class>/<file>") are relative to the test source,
which the manifest records and the selection hash covers.

Its classes are matched to the training classes by name: a selected class it
lacks, or a class it has that the training source lacks, is an error naming the
class (a model cannot be tested on a class it never saw, nor scored fairly
without one it was trained on). Training-source classes the run does not select
may be present or not, as for the source's own test split.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tasks import artifacts, storage
from tasks.config import RunConfig
from tasks.datasets import ImageFolder, indexed_folder, source_index
from tasks.errors import DatasetError
from tasks.redact import redact_uri

TEST_SPLIT = "test"


def index_test_source(source: str, cache_dir: str) -> dict[str, Any]:
    """Fetch and index a test source as acquire does the source; it must hold test images."""
    index = source_index(source, cache_dir)
    if not sum(index["counts"].get(TEST_SPLIT, {}).values()):
        raise DatasetError(f"test_source {redact_uri(source)} has no images under {TEST_SPLIT}/ (found splits "
                           f"{sorted(index['files'])}); lay it out as {TEST_SPLIT}/<class>/<image>, e.g. "
                           f"{TEST_SPLIT}/pizza/1.jpg")
    return index


@dataclass(frozen=True)
class SplitRoots:
    """Where a selection's paths resolve: test paths under the test source's root, the others under the source's.

    Used as an ImageFolder's root (`root / path`): a selection's paths start
    with their split ("train/…", "test/…").
    """

    source: Path
    test_source: Path

    def __truediv__(self, path: str) -> Path:
        return (self.test_source if path.split("/", 1)[0] == TEST_SPLIT else self.source) / path

    def __str__(self) -> str:
        return f"{self.source} (test split: {self.test_source})"


def with_test_source(cfg: RunConfig, folder: ImageFolder, selected: list[str]) -> ImageFolder:
    """The source's folder with its test split replaced by the test source's (unchanged without a test source).

    The test files are put in the source's label order; `selected` (class
    names) must all be in the test source, and it may hold no class the source
    lacks.
    """
    if not cfg.test_source:
        return folder
    index = storage.read_json(cfg.artifact(artifacts.ACQUIRED)).get("test_source")
    if index is None:
        raise DatasetError(f"acquire indexed no test_source for run {cfg.run_id!r}, but test_source is "
                           f"{redact_uri(cfg.test_source)}; re-run acquire for this run")
    test = indexed_folder(index, cfg.test_source, cfg.cache_dir)
    per_class = dict(zip(test.classes, test.files[TEST_SPLIT], strict=True))
    check_classes(selected, folder.classes, {name: len(files) for name, files in per_class.items()},
                  redact_uri(cfg.source), redact_uri(cfg.test_source))
    files = {**folder.files, TEST_SPLIT: tuple(per_class.get(name, ()) for name in folder.classes)}
    return replace(folder, root=SplitRoots(folder.root, test.root), files=files)


def check_classes(selected: list[str], source_classes: tuple[str, ...] | list[str], test_counts: dict[str, int],
                  source: str, test_source: str) -> None:
    """Refuse a test source that lacks a selected class or adds a class the training source does not have.

    `test_counts` is test images per class of the test source; a class folder
    without images counts as lacking.
    """
    lacking = [name for name in selected if not test_counts.get(name)]
    added = [name for name, count in test_counts.items() if count and name not in source_classes]
    problems = []
    if lacking:
        problems.append(f"lacks {_named(lacking, test_counts)} that the model is trained on; add "
                        f"{TEST_SPLIT}/<class>/ folders with images for {'it' if len(lacking) == 1 else 'them'} "
                        "there, or leave the class out of `classes`")
    if added:
        problems.append(f"has {_named(added, source_classes)} that the training source {source} lacks, so the "
                        "model can never predict it; remove "
                        + ("that class folder" if len(added) == 1 else "those class folders")
                        + " from the test source, or add the class to the training source")
    if problems:
        raise DatasetError(f"test_source {test_source} " + "; it also ".join(problems))


def manifest_entry(cfg: RunConfig) -> dict[str, Any] | None:
    """Where the test split came from, for the manifest: the test source (credentials redacted) and, for an
    archive, its sha256; None when the test split is the source's own."""
    if not cfg.test_source:
        return None
    index = storage.read_json(cfg.artifact(artifacts.ACQUIRED))["test_source"]
    return {"source": redact_uri(cfg.test_source), "split": TEST_SPLIT, "sha256": index.get("sha256", "")}


def _named(names: list[str], others) -> str:
    """'class "x"' or 'classes "x", "y"', each with the closest name of `others` when one is close (a misspelling)."""
    shown = []
    for name in names:
        close = difflib.get_close_matches(name, [other for other in others if other != name], n=1)
        shown.append(repr(name) + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ("class " if len(names) == 1 else "classes ") + ", ".join(shown)
