"""What a run is judged on cannot be gamed by its own selection: no test image the model trained on, no one-class
model; and an oddly named file is left out by name instead of failing the run."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from tasks import artifacts, model_card, storage
from tasks.config import RunConfig
from tasks.datasets import DatasetError
from tasks.steps.acquire import acquire
from tasks.steps.subsample import subsample
from tests.helpers.runs import write_image_folder


def run_subsample(folder: Path, tmp_path: Path, **params) -> tuple[RunConfig, dict, dict]:
    cfg = RunConfig(**{"source": str(folder), "run_root": str(tmp_path / "runs"),
                       "cache_dir": str(tmp_path / "cache"), "train_percent": 100, **params})
    result = subsample(cfg, acquire(cfg))
    return cfg, result, storage.read_json(cfg.artifact(artifacts.MANIFEST))


def test_test_images_identical_to_training_images_are_removed_and_counted(image_folder, tmp_path):
    shutil.copy(image_folder / "train/apple/0000.jpg", image_folder / "test/apple/copy.jpg")
    shutil.copy(image_folder / "train/banana/0003.jpg", image_folder / "test/cherry/relabelled.jpg")
    cfg, result, manifest = run_subsample(image_folder, tmp_path)
    assert sorted((d["path"], d["same_as"]) for d in manifest["test_duplicates"]) == [
        ("test/apple/copy.jpg", "train/apple/0000.jpg"), ("test/cherry/relabelled.jpg", "train/banana/0003.jpg")]
    tested = {f["path"] for f in manifest["files"] if f["split"] == "test"}
    assert not tested & {"test/apple/copy.jpg", "test/cherry/relabelled.jpg"}
    assert manifest["counts"]["test"] == {"apple": 4, "banana": 4, "cherry": 4} and result["n_test_duplicates"] == 2
    card = model_card._data_section(cfg, SimpleNamespace(manifest=manifest, acquired={}))
    assert "test images identical to a training or validation image removed: 2" in card


@pytest.mark.parametrize("classes", ["banana", "1"])
def test_a_selection_of_one_class_is_refused(classes, image_folder, tmp_path):
    with pytest.raises(DatasetError, match="needs at least 2"):
        run_subsample(image_folder, tmp_path, classes=classes)


def test_a_dataset_of_one_class_is_refused(tmp_path):
    folder = write_image_folder(tmp_path / "images", {"only": 4})
    with pytest.raises(DatasetError, match="1 class .*needs at least 2"):
        run_subsample(folder, tmp_path)


def test_files_and_folders_with_non_utf8_names_are_left_out_and_named(image_folder, tmp_path):
    root = os.fsencode(image_folder)
    with open(os.path.join(root, b"train", b"apple", b"caf\xe9.jpg"), "wb") as out:
        out.write((image_folder / "train/apple/0000.jpg").read_bytes())
    os.mkdir(os.path.join(root, b"test", b"\xff-class"))
    cfg, result, manifest = run_subsample(image_folder, tmp_path)
    skipped = sorted(item["path"] for item in manifest["skipped_names"])
    assert skipped == ["test/\\xff-class", "train/apple/caf\\xe9.jpg"]
    assert all("not valid UTF-8" in item["reason"] for item in manifest["skipped_names"])
    assert manifest["classes"] == ["apple", "banana", "cherry"] and result["counts"]["test"] == 12
