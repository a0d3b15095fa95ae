"""A test source of its own: its test split replaces the source's, its classes must match, the manifest says so."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from tasks import artifacts, storage
from tasks.config import RunConfig, candidate_list
from tasks.errors import DatasetError, PermanentError
from tasks.test_source import check_classes
from tests.helpers.runs import write_image_folder

FRUIT = {"apple": 12, "banana": 12, "cherry": 12}


def test_a_class_the_test_source_lacks_is_named_with_the_fix():
    with pytest.raises(DatasetError, match=r"test_source s3://b/new lacks class 'cherry' that the model is trained "
                                           r"on; add test/<class>/ folders .* or leave the class out of `classes`"):
        check_classes(["apple", "cherry"], ("apple", "banana", "cherry"), {"apple": 3, "banana": 2, "cherry": 0},
                      "s3://b/train", "s3://b/new")


def test_a_class_the_test_source_adds_is_named_with_the_closest_training_class():
    with pytest.raises(DatasetError, match=r"has class 'Cherry' \(did you mean 'cherry'\?\) that the training source "
                                           r"s3://b/train lacks, so the model can never predict it; remove that class "
                                           r"folder"):
        check_classes(["apple", "cherry"], ("apple", "banana", "cherry"), {"apple": 3, "cherry": 2, "Cherry": 1},
                      "s3://b/train", "s3://b/new")


def test_lacking_and_adding_are_reported_together_and_are_permanent():
    with pytest.raises(PermanentError, match="lacks class 'banana'.*it also has class 'kiwi'"):
        check_classes(["apple", "banana"], ("apple", "banana"), {"apple": 1, "kiwi": 4}, "src", "other")


def test_unselected_training_classes_may_be_absent_or_present():
    check_classes(["apple", "banana"], ("apple", "banana", "cherry"), {"apple": 1, "banana": 1}, "src", "other")
    check_classes(["apple", "banana"], ("apple", "banana", "cherry"), {"apple": 1, "banana": 1, "cherry": 1},
                  "src", "other")


# ---- through acquire and subsample (decodes with TensorFlow) ----

def config(tmp_path: Path, source: Path, test_source: Path | str = "", **params) -> RunConfig:
    return RunConfig(source=str(source), test_source=str(test_source), run_root=str(tmp_path / "runs"),
                     cache_dir=str(tmp_path / "cache"), train_percent=50, **params)


def run_subsample(cfg: RunConfig) -> dict:
    from tasks.steps.acquire import acquire
    from tasks.steps.subsample import subsample

    return subsample(cfg, acquire(cfg))


def test_test_split_comes_from_the_test_source_and_the_manifest_says_so(image_folder, tmp_path):
    other = write_image_folder(tmp_path / "other", {"apple": 5, "banana": 6, "cherry": 7}, splits=("test",), seed=9)
    shutil.copy(image_folder / "train" / "apple" / "0000.jpg", other / "test" / "apple" / "copy.jpg")
    cfg = config(tmp_path, image_folder, other)

    result = run_subsample(cfg)

    manifest = storage.read_json(cfg.artifact(artifacts.MANIFEST))
    assert manifest["test_source"] == {"source": str(other), "split": "test", "sha256": ""}
    test_files = [f for f in manifest["files"] if f["split"] == "test"]
    copied = {f["path"] for f in manifest["test_duplicates"]}
    on_disk = {f"test/{p.parent.name}/{p.name}" for p in (other / "test").rglob("*.jpg")}
    if "test/apple/copy.jpg" not in copied:  # the copy is a duplicate only when the draw put its original in train/val
        assert "test/apple/copy.jpg" in {f["path"] for f in test_files}
    assert {f["path"] for f in test_files} | copied == on_disk
    assert manifest["counts"]["test"] == {"apple": 6 - len(copied), "banana": 6, "cherry": 7}
    assert result["counts"]["test"] == 19 - len(copied)
    import hashlib

    assert all(f["sha256"] == hashlib.sha256((other / f["path"]).read_bytes()).hexdigest() for f in test_files)


def test_a_copy_of_a_training_image_in_the_test_source_is_removed(image_folder, tmp_path):
    other = write_image_folder(tmp_path / "other", {"apple": 2, "banana": 2, "cherry": 2}, splits=("test",), seed=9)
    for n in range(12):  # every apple training image, so whichever the draw picks is copied
        shutil.copy(image_folder / "train" / "apple" / f"{n:04d}.jpg", other / "test" / "apple" / f"copy{n}.jpg")
    cfg = config(tmp_path, image_folder, other)

    result = run_subsample(cfg)

    manifest = storage.read_json(cfg.artifact(artifacts.MANIFEST))
    assert result["n_test_duplicates"] == 6  # train_percent 50: 6 of the 12 apples are in train/val
    assert all(d["path"].startswith("test/apple/copy") and d["same_as"].startswith("train/apple/")
               for d in manifest["test_duplicates"])
    assert manifest["counts"]["test"]["apple"] == 2 + 6


def test_the_selection_hash_covers_where_the_test_split_came_from(image_folder, tmp_path):
    copy = shutil.copytree(image_folder, tmp_path / "copy")  # the same test files, from another source
    own = run_subsample(config(tmp_path, image_folder, run_id="own"))
    other = run_subsample(config(tmp_path, image_folder, copy, run_id="other"))

    assert own["counts"] == other["counts"]
    assert own["hash"] != other["hash"]


def test_a_test_source_missing_a_selected_class_fails_subsample_naming_it(image_folder, tmp_path):
    other = write_image_folder(tmp_path / "other", {"apple": 3, "banana": 3}, splits=("test",))
    with pytest.raises(DatasetError, match="lacks class 'cherry'"):
        run_subsample(config(tmp_path, image_folder, other))
    run_subsample(config(tmp_path, image_folder, other, classes="apple,banana", run_id="two"))  # not selected: fine


def test_a_test_source_without_a_test_folder_is_refused_at_acquire(image_folder, tmp_path):
    other = write_image_folder(tmp_path / "other", {"apple": 3, "banana": 3, "cherry": 3}, splits=("train",))
    with pytest.raises(DatasetError, match=r"has no images under test/ .*test/<class>/<image>"):
        run_subsample(config(tmp_path, image_folder, other))


def test_a_source_with_only_a_train_split_is_fine_with_a_test_source(tmp_path):
    source = write_image_folder(tmp_path / "train-only", FRUIT, splits=("train",))
    other = write_image_folder(tmp_path / "other", {"apple": 2, "banana": 2, "cherry": 2}, splits=("test",), seed=3)
    assert run_subsample(config(tmp_path, source, other))["counts"]["test"] == 6
    with pytest.raises(DatasetError, match=r"has no \['test'\] split"):
        run_subsample(config(tmp_path, source, run_id="alone"))


@pytest.mark.slow
def test_a_run_is_evaluated_on_the_test_source_and_says_the_images_differ(tmp_path, cache_dir):
    """acquire → subsample → train → evaluate at 32 px: every test number is the test source's, and a test source
    whose classes wear each other's colours is reported as differing from the training images."""
    from tasks.steps.evaluate import evaluate
    from tasks.steps.select import select
    from tasks.steps.train import train

    names = ("dark", "light", "mid")  # write_image_folder colours classes by sorted name
    source = write_image_folder(tmp_path / "images", {name: 16 for name in names}, splits=("train",))
    shifted = write_image_folder(tmp_path / "shifted", {"a": 8, "b": 8, "c": 8}, splits=("test",), seed=5)
    for old, new in {"a": "mid", "b": "dark", "c": "light"}.items():  # every class in another class's colour
        (shifted / "test" / old).rename(shifted / "test" / new)
    cfg = RunConfig(source=str(source), test_source=str(shifted), run_root=str(tmp_path / "runs"),
                    cache_dir=cache_dir, train_percent=100, val_fraction=0.25, image_size=32, batch_size=16,
                    epochs=8, patience=8, learning_rate=0.01, fine_tune="never", top_k=1, top_k_wrong=5)

    from tasks.steps.acquire import acquire
    from tasks.steps.subsample import subsample

    data = subsample(cfg, acquire(cfg))
    (only,) = candidate_list(cfg)
    best = select(cfg, [train(cfg, data, dataclasses.asdict(only))])
    result = evaluate(cfg.for_candidate(only), data, best, None)

    metrics = storage.read_json(result["metrics_uri"])
    gap = metrics["validation_vs_test"]
    assert metrics["n_test"] == 24 and gap["test"]["n"] == 24 and gap["validation"]["n"] == 12
    assert gap["test"]["source"] == str(shifted)
    assert gap["validation"]["accuracy"] >= 0.9 and metrics["accuracy"] <= 0.5
    assert gap["differ"] and gap["statement"].startswith("Your test images differ from your training images")
    predictions = (storage.local_path(cfg.artifact(artifacts.REPORT)) / "predictions.csv").read_text()
    assert predictions.count("test/") == 24
    page = storage.read_text(result["report_uri"])
    assert "Validation vs test" in page and "Your test images differ from your training images" in page
    card = storage.read_text(result["model_card_uri"])
    assert f"`{shifted}` (test_source)" in card and "Your test images differ" in card
