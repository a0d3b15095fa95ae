"""Acquire: every source kind becomes the same cached image folder, safely and checked."""
from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import json
import logging
import shutil
import socket
import struct
import tarfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from tasks import artifacts, scratch, storage
from tasks import datasets as acq
from tasks.config import RunConfig
from tasks.datasets import DatasetError, IdxDataset, IdxFile, local_dataset, scan
from tasks.errors import DownloadError
from tasks.steps.acquire import acquire
from tasks.steps.subsample import subsample
from tests.helpers.datasets import add_tar_member, add_zip_symlink, archive_folder, idx_bytes, serve, truncated_copy
from tests.helpers.runs import write_image_folder

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def files_below(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_local_folder_is_used_in_place_without_copying(image_folder, tmp_path):
    cache = tmp_path / "cache"
    assert local_dataset(str(image_folder), cache) == image_folder
    assert local_dataset(f"file://{image_folder}", cache) == image_folder
    assert not cache.exists()


def test_folder_inside_one_top_level_directory_is_found(image_folder, tmp_path):
    wrapper = tmp_path / "wrapper"
    wrapper.mkdir()
    shutil.move(image_folder, wrapper / "10_food_classes")
    assert local_dataset(str(wrapper), tmp_path / "cache") == wrapper / "10_food_classes"


def test_folder_without_train_split_names_the_layout(tmp_path):
    (tmp_path / "flat" / "pizza").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no train/ folder.*<split>/<class>/<image>"):
        local_dataset(str(tmp_path / "flat"), tmp_path / "cache")


def test_acquire_summarises_classes_splits_and_counts(image_folder, tmp_path):
    cfg = RunConfig(source=str(image_folder), run_root=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"))
    result = acquire(cfg)
    assert result == {"source": str(image_folder), "n_classes": 3, "counts": {"test": 12, "train": 36},
                      "uri": cfg.artifact(artifacts.ACQUIRED)}
    summary = storage.read_json(result["uri"])
    assert summary["classes"] == ["apple", "banana", "cherry"]
    assert sorted(summary["files"]) == ["test", "train"] and summary["root"]
    assert summary["counts"]["train"] == {"apple": 12, "banana": 12, "cherry": 12}
    assert summary["sha256"] == ""


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_http_archive_is_downloaded_checksummed_and_cached(kind, image_folder, tmp_path, caplog):
    www = tmp_path / "www"
    archive = archive_folder(image_folder, www / f"10_food_classes.{kind}", top="10_food_classes")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    with serve(www) as server, caplog.at_level(logging.INFO, logger="tasks.datasets"):
        source = server.url(archive.name)
        cfg = RunConfig(source=source, source_sha256=digest, run_root=str(tmp_path / "runs"), cache_dir=str(cache))
        first = acquire(cfg)
        second = acquire(cfg)
        assert server.requests == [f"/{archive.name}"]
    assert first == second
    assert first["counts"] == {"test": 12, "train": 36}
    assert storage.read_json(first["uri"])["sha256"] == digest
    assert any("100%" in message for message in caplog.messages)
    root = local_dataset(source, cache)
    assert root.is_relative_to(cache) and scan(root).classes == ("apple", "banana", "cherry")


def test_archive_with_wrong_sha256_is_refused_and_not_cached(image_folder, tmp_path):
    www = tmp_path / "www"
    archive = archive_folder(image_folder, www / "food.zip")
    cache = tmp_path / "cache"
    with serve(www) as server:
        with pytest.raises(DatasetError, match="sha256 is [0-9a-f]{64}, expected 0{64}"):
            local_dataset(server.url("food.zip"), cache, "0" * 64)
        assert files_below(cache) == []
        right = hashlib.sha256(archive.read_bytes()).hexdigest()
        assert scan(local_dataset(server.url("food.zip"), cache, right)).counts()["test"]["apple"] == 4
        assert len(server.requests) == 2


def test_missing_url_is_a_dataset_error(tmp_path):
    with serve(tmp_path) as server, pytest.raises(DatasetError, match="HTTP 404"):
        local_dataset(server.url("nothing.zip"), tmp_path / "cache")


def _zip_with_parent_path(archive: Path) -> None:
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("data/train/a/1.jpg", b"fine")
        bundle.writestr("../evil.txt", b"escaped")


def _zip_with_symlink(archive: Path) -> None:
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("data/train/a/1.jpg", b"fine")
        add_zip_symlink(bundle, "data/train/a/link", str(archive.parent / "evil.txt"))


def _tar_with_absolute_path(archive: Path) -> None:
    with tarfile.open(archive, "w:gz") as bundle:
        add_tar_member(bundle, "data/train/a/1.jpg", b"fine")
        add_tar_member(bundle, str(archive.parent / "evil.txt"), b"escaped")


def _tar_with_symlink(archive: Path) -> None:
    with tarfile.open(archive, "w:gz") as bundle:
        add_tar_member(bundle, "data/train/a/1.jpg", b"fine")
        add_tar_member(bundle, "data/train/a/link", kind=tarfile.SYMTYPE, linkname=str(archive.parent))
        add_tar_member(bundle, "data/train/a/link/evil.txt", b"escaped")


def _tar_with_hardlink(archive: Path) -> None:
    with tarfile.open(archive, "w:gz") as bundle:
        add_tar_member(bundle, "data/train/a/1.jpg", b"fine")
        add_tar_member(bundle, "data/train/a/evil.txt", kind=tarfile.LNKTYPE, linkname="/etc/passwd")


@pytest.mark.parametrize("name, write", [
    ("parent.zip", _zip_with_parent_path),
    ("symlink.zip", _zip_with_symlink),
    ("absolute.tar.gz", _tar_with_absolute_path),
    ("symlink.tar.gz", _tar_with_symlink),
    ("hardlink.tgz", _tar_with_hardlink),
])
def test_archive_member_escaping_the_target_is_refused_and_nothing_is_written(name, write, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    archive = outside / name
    write(archive)
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match="refused and nothing was extracted"):
        local_dataset(str(archive), cache)
    assert files_below(cache) == []
    assert files_below(outside) == [archive]
    assert [p for p in tmp_path.rglob("evil.txt")] == []


@pytest.fixture
def downloads(monkeypatch) -> list[str]:
    """The URIs storage.download fetches from from now on."""
    fetched = []
    original = storage.download

    def counting(uri, local):
        fetched.append(uri)
        return original(uri, local)

    monkeypatch.setattr(storage, "download", counting)
    return fetched


def test_s3_prefix_is_downloaded_once_and_again_only_where_its_listing_changed(s3_bucket, image_folder, tmp_path,
                                                                                downloads):
    source = f"{s3_bucket}/datasets/food/"
    storage.upload(image_folder, source)
    cache = tmp_path / "cache"
    root = local_dataset(source, cache)
    assert root.is_relative_to(cache)
    assert scan(root).counts() == scan(image_folder).counts() and len(downloads) == 48
    assert local_dataset(source, cache) == root and len(downloads) == 48  # unchanged: nothing fetched

    added = write_image_folder(tmp_path / "more", {"date": 3}, splits=("train", "test"), seed=7)
    storage.upload(added, source)  # a third... fourth class, 6 images
    changed = f"{source}train/apple/0000.jpg"
    storage.write_bytes(changed, (added / "train" / "date" / "0000.jpg").read_bytes())
    storage.delete(f"{source}test/cherry/0003.jpg")
    del downloads[:]
    again = local_dataset(source, cache)
    date_images = [f"{source}{split}/date/{n:04d}.jpg" for split in ("train", "test") for n in range(3)]
    assert again != root and sorted(downloads) == sorted([changed, *date_images])
    folder = scan(again)
    assert folder.classes == ("apple", "banana", "cherry", "date")
    assert folder.counts()["test"] == {"apple": 4, "banana": 4, "cherry": 3, "date": 3}
    assert (again / "train/apple/0000.jpg").read_bytes() == storage.read_bytes(changed)
    assert (root / "train/apple/0000.jpg").read_bytes() == (image_folder / "train/apple/0000.jpg").read_bytes()


def test_another_worker_sees_the_data_acquire_indexed_or_refuses(s3_bucket, image_folder, tmp_path):
    source = f"{s3_bucket}/food/"
    storage.upload(image_folder, source)
    cfg = RunConfig(source=source, run_root=str(tmp_path / "runs"), cache_dir=str(tmp_path / "worker-a"))
    acquired = acquire(cfg)
    indexed = acq.read_acquired(cfg, acquired)
    (tmp_path / "worker-a").rename(tmp_path / "elsewhere")  # worker-a's disk is not on the other workers
    seen = acq.read_acquired(dataclasses.replace(cfg, cache_dir=str(tmp_path / "worker-b")), acquired)
    assert seen.root.is_relative_to(tmp_path / "worker-b") and seen.files == indexed.files
    storage.write_bytes(f"{source}train/apple/0000.jpg", b"changed")
    with pytest.raises(DatasetError, match="changed after acquire indexed it"):
        acq.read_acquired(dataclasses.replace(cfg, cache_dir=str(tmp_path / "worker-c")), acquired)


def test_a_folder_changed_after_acquire_is_refused_not_half_read(image_folder, tmp_path):
    cfg = RunConfig(source=str(image_folder), run_root=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"))
    acquired = acquire(cfg)
    assert acq.read_acquired(cfg, acquired).root == image_folder
    (image_folder / "train" / "apple" / "0000.jpg").write_bytes(b"replaced")
    with pytest.raises(DatasetError, match="changed after acquire indexed it"):
        acq.read_acquired(cfg, acquired)


def test_s3_archive_is_fetched_and_extracted(s3_bucket, image_folder, tmp_path):
    archive = archive_folder(image_folder, tmp_path / "food.tgz")
    storage.upload(archive, f"{s3_bucket}/food.tgz")
    root = local_dataset(f"{s3_bucket}/food.tgz", tmp_path / "cache")
    assert scan(root).counts()["train"] == {"apple": 12, "banana": 12, "cherry": 12}


def test_tfds_dataset_becomes_an_image_folder_in_its_class_order(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=9):
        cfg = RunConfig(source="tfds://beans", run_root=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"))
        result = acquire(cfg)
    assert result["counts"] == {"test": 9, "train": 9}
    summary = storage.read_json(result["uri"])
    assert summary["classes"] == ["angular_leaf_spot", "bean_rust", "healthy"]
    root = local_dataset("tfds://beans", tmp_path / "cache")
    images = [root / path for paths in scan(root).files["train"] for path in paths]
    assert all(path.suffix == ".png" and Image.open(path).size for path in images)


def test_tfds_split_choice_prefers_test_then_validation():
    assert acq.tfds_splits("tfds://x", ["train", "test", "validation"], "") == {"train": "train", "test": "test"}
    assert acq.tfds_splits("tfds://x", ["train", "validation"], "") == {"train": "train", "test": "validation"}
    assert acq.tfds_splits("tfds://x", ["train"], "train[:80%],train[80%:]") == {
        "train": "train[:80%]", "test": "train[80%:]"}
    with pytest.raises(DatasetError, match=r"split=TRAIN,TEST"):
        acq.tfds_splits("tfds://x", ["train"], "")


def _tiny_idx(folder: Path, n_train: int = 30, n_test: int = 10) -> dict[str, tuple[np.ndarray, str, str]]:
    """Four IDX .gz files of 3 classes; returns name -> (array, content sha256, .gz sha256)."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": np.arange(n_train, dtype=np.uint8) % 3,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": np.arange(n_test, dtype=np.uint8) % 3,
    }
    folder.mkdir(parents=True, exist_ok=True)
    result = {}
    for name, array in arrays.items():
        data = idx_bytes(array)
        (folder / name).write_bytes(data)
        result[name] = (array, hashlib.sha256(gzip.decompress(data)).hexdigest(),
                        hashlib.sha256(data).hexdigest())
    return result


def _tiny_spec(files: dict, local_dir: Path, base_url: str = "http://127.0.0.1:9/") -> IdxDataset:
    entry = {name: IdxFile(name, download_sha, sha) for name, (_, sha, download_sha) in files.items()}
    return IdxDataset(classes=("T-shirt/top", "Trouser", "Bag"), local_dir=str(local_dir), base_url=base_url,
                      train_images=entry["train-images-idx3-ubyte.gz"],
                      train_labels=entry["train-labels-idx1-ubyte.gz"],
                      test_images=entry["t10k-images-idx3-ubyte.gz"],
                      test_labels=entry["t10k-labels-idx1-ubyte.gz"])


def test_idx_files_become_pngs_with_real_class_names(tmp_path, monkeypatch):
    files = _tiny_idx(tmp_path / "idx")
    monkeypatch.setitem(acq.IDX_DATASETS, "tiny", _tiny_spec(files, tmp_path / "idx"))
    root = local_dataset("idx://tiny", tmp_path / "cache")
    folder = scan(root)
    assert folder.classes == ("T-shirt/top", "Trouser", "Bag")
    assert folder.counts() == {"train": {"T-shirt/top": 10, "Trouser": 10, "Bag": 10},
                               "test": {"T-shirt/top": 4, "Trouser": 3, "Bag": 3}}
    assert (root / "train" / "T-shirt_top").is_dir()
    images = files["train-images-idx3-ubyte.gz"][0]
    assert np.array_equal(np.asarray(Image.open(root / "train" / "Trouser" / "00004.png")), images[4])


def test_idx_files_are_downloaded_and_checked_when_not_installed(tmp_path, monkeypatch):
    www = tmp_path / "www"
    files = _tiny_idx(www)
    with serve(www) as server:
        spec = _tiny_spec(files, tmp_path / "not-installed", base_url=server.url(""))
        monkeypatch.setitem(acq.IDX_DATASETS, "tiny", spec)
        root = local_dataset("idx://tiny", tmp_path / "cache")
        assert len(server.requests) == 4
    assert scan(root).counts()["train"]["Bag"] == 10


def test_idx_file_with_wrong_checksum_is_refused(tmp_path):
    _tiny_idx(tmp_path / "idx")
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz: sha256 of its content is .* expected c59f"):
        local_dataset(f"idx://fashion_mnist?dir={tmp_path / 'idx'}", tmp_path / "cache")
    assert files_below(tmp_path / "cache") == []


def test_unknown_scheme_lists_the_supported_sources(tmp_path):
    with pytest.raises(DatasetError, match=r"unsupported dataset source 'ftp://x/y'.*tfds://.*s3://.*idx://"):
        local_dataset("ftp://x/y", tmp_path)


def test_checksum_for_a_folder_source_is_an_error(image_folder, tmp_path):
    with pytest.raises(DatasetError, match="not an archive"):
        local_dataset(str(image_folder), tmp_path, "ab" * 32)


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_has_its_classes_and_counts_and_subsamples_with_defaults(tmp_path):
    cfg = RunConfig(run_root=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"))
    started = time.perf_counter()
    result = acquire(cfg)
    acquired_s = time.perf_counter() - started
    assert result["counts"] == {"test": 10000, "train": 60000}
    summary = storage.read_json(result["uri"])
    assert summary["classes"] == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                  "Sneaker", "Bag", "Ankle boot"]
    assert set(summary["counts"]["train"].values()) == {6000}
    assert set(summary["counts"]["test"].values()) == {1000}
    root = local_dataset(cfg.source, cfg.cache_dir)
    assert json.loads((root / "classes.json").read_text())["folders"][0] == "T-shirt_top"

    started = time.perf_counter()
    selected = subsample(cfg, result)
    logging.getLogger(__name__).info("Fashion-MNIST: acquire %.1f s, subsample with defaults %.1f s",
                                     acquired_s, time.perf_counter() - started)
    assert selected["counts"] == {"train": 5400, "val": 600, "test": 10000}
    assert selected["n_classes"] == 10 and selected["n_skipped"] == 0
    assert storage.read_json(selected["manifest"])["counts"]["val"]["T-shirt/top"] == 60


@pytest.mark.parametrize("folder", ["../../elsewhere", "/tmp", "a/b", "..", ""])
def test_classes_json_folder_outside_the_split_is_refused(folder, image_folder, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(image_folder / "train" / "apple" / "0000.jpg", elsewhere / "stolen.jpg")
    (image_folder / "classes.json").write_text(json.dumps(
        {"classes": ["apple", "banana", "cherry", "other"], "folders": ["apple", "banana", "cherry", folder]}))
    with pytest.raises(DatasetError, match=r"classes.json: folder .* could point outside .*plain name"):
        scan(image_folder)


def test_download_above_the_limit_is_refused_from_its_content_length(image_folder, tmp_path, monkeypatch):
    www = tmp_path / "www"
    archive = archive_folder(image_folder, www / "food.zip")
    monkeypatch.setenv("TLP_MAX_DOWNLOAD_BYTES", str(archive.stat().st_size - 1))
    with serve(www) as server, pytest.raises(DatasetError, match="bytes to download, above the limit of .*"
                                                                  "TLP_MAX_DOWNLOAD_BYTES"):
        local_dataset(server.url("food.zip"), tmp_path / "cache")
    assert files_below(tmp_path / "cache") == []


def test_download_without_content_length_stops_at_the_limit(image_folder, tmp_path, monkeypatch):
    www = tmp_path / "www"
    archive_folder(image_folder, www / "food.zip")
    monkeypatch.setenv("TLP_MAX_DOWNLOAD_BYTES", "30000")
    refused = pytest.raises(DatasetError, match="limit of 30,000 .*TLP_MAX_DOWNLOAD")
    with serve(www, send_length=False) as server, refused:
        local_dataset(server.url("food.zip"), tmp_path / "cache")
    assert files_below(tmp_path / "cache") == []


def test_s3_prefix_above_the_download_limit_is_refused_before_downloading(s3_bucket, image_folder, tmp_path,
                                                                           monkeypatch):
    storage.upload(image_folder, f"{s3_bucket}/food")
    monkeypatch.setenv("TLP_MAX_DOWNLOAD_BYTES", "1000")
    with pytest.raises(DatasetError, match="bytes to download, above the limit"):
        local_dataset(f"{s3_bucket}/food/", tmp_path / "cache")
    assert files_below(tmp_path / "cache") == []


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
@pytest.mark.parametrize("env, value, what", [("TLP_MAX_ARCHIVE_MEMBERS", "47", "members"),
                                              ("TLP_MAX_ARCHIVE_BYTES", "20000", "bytes uncompressed")])
def test_archive_above_the_limits_is_refused_before_extracting(kind, env, value, what, image_folder, tmp_path,
                                                                monkeypatch):
    archive = archive_folder(image_folder, tmp_path / "in" / f"food.{kind}")  # 48 images
    monkeypatch.setenv(env, value)
    with pytest.raises(DatasetError, match=f"{what}, above the limit .*{env}.*nothing was extracted"):
        local_dataset(str(archive), tmp_path / "cache")
    assert files_below(tmp_path / "cache") == []


def _cut_at_a_member_header(archive: Path) -> int:
    with tarfile.open(archive) as bundle:
        return bundle.getmembers()[-1].offset


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "zip"])
def test_truncated_archive_is_an_error_and_never_cached(kind, image_folder, tmp_path):
    whole = tmp_path / "whole" / f"food.{kind}"
    if kind == "tar":
        whole.parent.mkdir()
        with tarfile.open(whole, "w") as bundle:
            bundle.add(image_folder, "food")
        size = _cut_at_a_member_header(whole)  # a cut on a block boundary reads like a smaller, complete tar
    else:
        archive_folder(image_folder, whole)
        size = whole.stat().st_size * 2 // 3
    archive = truncated_copy(whole, tmp_path / f"food.{kind}", size)
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match="(it is|may be) truncated"):
        local_dataset(str(archive), cache)
    assert files_below(cache) == [] and acq.cache_record(str(archive), cache) == {}


@pytest.mark.parametrize("status", [503, 429])
def test_server_failure_is_retried_and_leaves_nothing_cached(status, image_folder, tmp_path):
    www = tmp_path / "www"
    archive_folder(image_folder, www / "food.zip")
    cache = tmp_path / "cache"
    with serve(www, failures=(status,)) as server:
        with pytest.raises(DownloadError, match=f"HTTP {status}.*retrying"):
            local_dataset(server.url("food.zip"), cache)
        assert files_below(cache) == []
        assert scan(local_dataset(server.url("food.zip"), cache)).counts()["train"]["apple"] == 12
        assert len(server.requests) == 2


def test_client_error_other_than_throttling_is_permanent(tmp_path):
    with serve(tmp_path, failures=(403,)) as server, pytest.raises(DatasetError, match="HTTP 403.*check the URL"):
        local_dataset(server.url("food.zip"), tmp_path / "cache")


@contextlib.contextmanager
def _broken_server(answer: bytes | None) -> Iterator[str]:
    """A loopback HTTP 'server' that sends `answer` then resets the connection, or (None) never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve_one() -> None:
        connection, _ = listener.accept()
        connection.recv(65536)
        if answer is None:
            done.wait(10)
        else:
            connection.sendall(answer)
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.close()

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/food.zip"
    finally:
        done.set()
        thread.join()
        listener.close()


@pytest.mark.parametrize("answer", [
    None,                                                                        # timeout
    b"",                                                                         # reset before any answer
    b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"PK" * 1000,         # reset halfway
])
def test_network_failures_are_retried_and_leave_nothing_cached(answer, tmp_path, monkeypatch):
    monkeypatch.setattr(acq, "DOWNLOAD_TIMEOUT_S", 0.5)
    with _broken_server(answer) as url, pytest.raises(DownloadError, match="retrying"):
        local_dataset(url, tmp_path / "cache")
    assert files_below(tmp_path / "cache") == []


def test_presigned_source_is_written_and_logged_without_its_credentials(image_folder, tmp_path, caplog):
    www = tmp_path / "www"
    archive_folder(image_folder, www / "food.zip")
    secrets = ("AKIDSECRET", "f00dcafe")
    with serve(www) as server, caplog.at_level(logging.INFO):
        source = server.url("food.zip") + "?X-Amz-Credential=AKIDSECRET&X-Amz-Signature=f00dcafe"
        cfg = RunConfig(source=source, run_root=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"),
                        train_percent=50)
        acquired = acquire(cfg)
        selected = subsample(cfg, acquired)
    written = [storage.read_text(acquired["uri"]), storage.read_text(selected["manifest"]), str(acquired),
               *(path.read_text() for path in files_below(tmp_path / "cache") if path.suffix == ".json"),
               caplog.text]
    assert not [text for text in written for secret in secrets if secret in text]
    assert storage.read_json(acquired["uri"])["source"] == server.url("food.zip") + (
        "?X-Amz-Credential=***&X-Amz-Signature=***")


def test_a_killed_acquire_leaves_no_scratch_behind_for_ever(image_folder, tmp_path):
    from tests.helpers.scratch import dead_pid, left_behind

    datasets = tmp_path / "cache" / "datasets"
    datasets.mkdir(parents=True)
    killed = left_behind(datasets, "acquire-killed", scratch._owner(dead_pid()), scratch.STALE_AFTER_S + 60)
    archive = archive_folder(image_folder, tmp_path / "food.zip")
    root = local_dataset(str(archive), tmp_path / "cache")
    assert not killed.exists()
    assert sorted(p.name for p in datasets.iterdir()) == [root.parent.name]


def _bomb(image_folder: Path, archive: Path) -> Path:
    """The image folder plus one member of 8 MB of zeros (a few KB compressed)."""
    archive_folder(image_folder, archive)
    zeros = bytes(8 << 20)
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive, "a", compression=zipfile.ZIP_DEFLATED) as bundle:
            bundle.writestr("train/apple/zeros.png", zeros)
    else:
        with tarfile.open(archive, "w:gz") as bundle:
            bundle.add(image_folder, "")
            add_tar_member(bundle, "train/apple/zeros.png", zeros)
    return archive


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_compression_bomb_is_refused_before_extracting(kind, image_folder, tmp_path):
    archive = _bomb(image_folder, tmp_path / "in" / f"food.{kind}")
    assert archive.stat().st_size < (8 << 20) // 100  # far under the 50 GiB and member limits
    with pytest.raises(DatasetError, match=r"zeros.png.*expands .*TLP_MAX_COMPRESSION_RATIO.*nothing was extracted"):
        local_dataset(str(archive), tmp_path / "cache")
    assert files_below(tmp_path / "cache") == []


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_extraction_that_would_fill_the_disk_is_refused(kind, image_folder, tmp_path, monkeypatch):
    archive = archive_folder(image_folder, tmp_path / "in" / f"food.{kind}")
    monkeypatch.setenv("TLP_MIN_FREE_BYTES", str(shutil.disk_usage(tmp_path).free))
    with pytest.raises(DatasetError, match="free on the disk .*TLP_MIN_FREE_BYTES.*nothing was written"):
        local_dataset(str(archive), tmp_path / "cache")
    assert files_below(tmp_path / "cache") == []


def test_default_member_limit_fits_a_workers_memory():
    from tasks.settings import Limits

    # each listed member holds a TarInfo/ZipInfo (~0.5 KB) in memory until extraction and an inode after it
    assert Limits().max_archive_members * 512 <= 256 << 20


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out" / "record.json"
    storage.write_json(str(target), {"kept": 1})

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(scratch.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        storage.write_json(str(target), {"kept": 2})
    assert sorted(p.name for p in target.parent.iterdir()) == ["record.json"]
    assert storage.read_json(str(target)) == {"kept": 1}


def test_a_download_cut_short_leaves_no_partial_file(image_folder, tmp_path, monkeypatch):
    www = tmp_path / "www"
    archive = archive_folder(image_folder, www / "food.zip")
    monkeypatch.setattr(acq, "DOWNLOAD_CHUNK_BYTES", 1024)
    monkeypatch.setenv("TLP_MAX_DOWNLOAD_BYTES", str(archive.stat().st_size // 2))
    target = tmp_path / "down" / "food.zip"
    target.parent.mkdir()
    with serve(www) as server, pytest.raises(DatasetError):
        acq.download(server.url(archive.name), target)
    assert list(target.parent.iterdir()) == []
