"""Datasets: turn a dataset source URI into a local image folder, and list it.

Every source becomes the same layout, `root/<split>/<class folder>/<image file>`,
so subsample has one thing to read whatever the source was:

- `tfds://<name>[?split=TRAIN,TEST]`: a TensorFlow Datasets image classification
  dataset. Its "train" split is train; its "test" split is test, or "validation"
  when it has no "test" split. `?split=` names both explicitly, in TFDS split
  syntax (`tfds://food101?split=train[:20%],validation`). Images keep the
  encoded bytes TFDS stores (no re-encoding).
- `http(s)://…/<name>.zip|.tar|.tar.gz|.tgz|.tar.bz2|.tar.xz`, or such an archive as a
  local path, `file://` or `s3://` URI: an image folder, possibly inside one
  top-level directory. Its sha256 is computed, recorded and checked against
  `sha256` when given. Members that could land outside the extraction folder
  (`..`, absolute paths, links, devices), more members or uncompressed bytes
  than the deployment's limits (tasks.settings.Limits), or a truncated tar make
  the whole archive refused before anything is extracted.
- a local folder or `file://` URI: used in place, nothing is copied.
- `s3://<bucket>/<prefix>/`: the folder below the prefix, downloaded.
- `idx://fashion_mnist[?dir=DIR]`: the IDX files from DIR, else from the Debian
  package's folder, else from the public URLs; each file's content is checked
  against its known sha256.

Everything that is downloaded or converted lives in the cache under a key
derived from the source URI: a second call with the same source is a cache hit
and fetches nothing (so a changed object behind the same URI needs a new URI,
a checksum, or a cleared cache). Each cache entry is built in a scratch folder
and renamed into place, so a failed or refused fetch leaves nothing behind.
Downloads stop at the deployment's download limit. A failure that may pass (a
timeout, a reset connection, HTTP 5xx or 429) raises DownloadError, which the
DAG retries; one that will not (another 4xx, a bad archive or checksum) raises
DatasetError. What is written or logged about a source has its credentials
redacted (tasks.redact).

A `classes.json` at the dataset root (`{"classes": [...], "folders": [...]}`)
fixes the label order and the real class names when folder names cannot carry
them: Fashion-MNIST's "T-shirt/top" lives in the folder "T-shirt_top", and a
TFDS dataset keeps its own label order. Without it the classes are the sorted
folder names. Hidden files (".DS_Store") are not dataset files.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import logging
import lzma
import math
import os
import re
import shutil
import stat
import struct
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import parse_qs, urlparse

from tasks import artifacts, settings, storage
from tasks.errors import DatasetError, DownloadError
from tasks.redact import redact_uri
from tasks.scratch import scratch_dir

if TYPE_CHECKING:
    from tasks.config import RunConfig

log = logging.getLogger(__name__)

SUPPORTED_SOURCES = (
    "tfds://<name>[?split=TRAIN,TEST]",
    "http(s)://…/<archive> (.zip, .tar, .tar.gz, .tgz, .tar.bz2, .tar.xz)",
    "a local path, file:// or s3:// URI of such an archive",
    "a local folder or file://<folder> laid out as <split>/<class>/<image>",
    "s3://<bucket>/<prefix>/ laid out as <split>/<class>/<image>",
    "idx://fashion_mnist[?dir=<folder with the IDX .gz files>]",
)
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
CLASSES_FILE = "classes.json"
IMAGES_DIR = "images"
RECORD_FILE = "source.json"
DOWNLOAD_CHUNK_BYTES = 1 << 16
DOWNLOAD_TIMEOUT_S = 60
UNKNOWN_SIZE_LOG_BYTES = 10 << 20
IMAGE_MAGIC = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG", ".png"), (b"GIF8", ".gif"), (b"BM", ".bmp"),
               (b"RIFF", ".webp"))


@dataclass(frozen=True)
class IdxFile:
    """One IDX file of a dataset, with the checksums that identify it.

    `sha256` is of the decompressed IDX bytes: the Debian package re-gzips the
    files (dropping the file name from the gzip header), so only the content
    hash is the same for both copies. `download_sha256` is of the published
    .gz and is checked as soon as a download completes.
    """

    name: str
    download_sha256: str
    sha256: str


@dataclass(frozen=True)
class IdxDataset:
    """An MNIST-family dataset published as four gzipped IDX files."""

    classes: tuple[str, ...]
    local_dir: str
    base_url: str
    train_images: IdxFile
    train_labels: IdxFile
    test_images: IdxFile
    test_labels: IdxFile


IDX_DATASETS: dict[str, IdxDataset] = {
    "fashion_mnist": IdxDataset(
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"),
        local_dir="/usr/share/datasets/fashion-mnist",
        # The bucket's website endpoint serves plain HTTP only; the checksums protect the content.
        base_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        train_images=IdxFile("train-images-idx3-ubyte.gz",
                             "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                             "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
        train_labels=IdxFile("train-labels-idx1-ubyte.gz",
                             "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                             "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
        test_images=IdxFile("t10k-images-idx3-ubyte.gz",
                            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
        test_labels=IdxFile("t10k-labels-idx1-ubyte.gz",
                            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    ),
}


@dataclass(frozen=True)
class ImageFolder:
    """A materialised dataset: its classes in label order and its files per split.

    `files[split][label]` lists that class's files as sorted paths relative to
    the root ("train/pizza/1.jpg"), so filesystem order never matters.
    """

    root: Path
    classes: tuple[str, ...]
    files: dict[str, tuple[tuple[str, ...], ...]]

    def counts(self) -> dict[str, dict[str, int]]:
        return {split: {name: len(paths) for name, paths in zip(self.classes, per_class)}
                for split, per_class in self.files.items()}


def local_dataset(source: str, cache_dir: str | Path, sha256: str = "") -> Path:
    """The local root of a source's image folder, fetched into the cache when needed."""
    scheme = urlparse(source).scheme
    if _is_archive(source):
        return _cached(source, cache_dir, sha256, lambda work: _archive_folder(source, sha256, work))
    if sha256:
        raise DatasetError(f"source_sha256 is given but {redact_uri(source)} is not an archive; checksums are "
                           "checked for archive sources only, so leave source_sha256 empty")
    if scheme in ("", "file"):
        return find_root(storage.local_path(source))
    if scheme == "s3":
        return _cached(source, cache_dir, "", lambda work: _s3_folder(source, work))
    if scheme == "tfds":
        return _cached(source, cache_dir, "", lambda work: _tfds_folder(source, cache_dir, work))
    if scheme == "idx":
        return _cached(source, cache_dir, "", lambda work: _idx_folder(source, work))
    raise DatasetError(f"unsupported dataset source {redact_uri(source)!r}; use one of: "
                       + "; ".join(SUPPORTED_SOURCES))


def read_acquired(cfg: RunConfig, acquired: dict[str, Any]) -> ImageFolder:
    """The dataset acquire indexed, as an ImageFolder whose root is readable on this worker.

    On the worker that ran acquire the root is its cache entry. A worker that
    does not share that disk (Celery, Kubernetes) materialises the same source
    into its own cache once; the index, not a new scan, still decides the files.
    """
    (uri,) = artifacts.require(cfg, artifacts.ACQUIRED)
    if acquired.get("uri") not in (None, uri):
        raise DatasetError(f"acquire wrote its index to {acquired['uri']}, but this run's index is {uri}; "
                           "re-run acquire for this run")
    index = storage.read_json(uri)
    root = Path(index["root"])
    if not root.is_dir():
        log.info("dataset root %s is not on this worker; materialising %s into its cache", root, index["source"])
        root = local_dataset(cfg.source, cfg.cache_dir, cfg.source_sha256)
    files = {split: tuple(tuple(paths) for paths in per_class) for split, per_class in index["files"].items()}
    return ImageFolder(root=root, classes=tuple(index["classes"]), files=files)


def scan(root: Path) -> ImageFolder:
    """List a dataset root's classes and files; `classes.json`, when present, fixes names and order."""
    splits = sorted(p.name for p in root.iterdir() if p.is_dir() and not _hidden(p.name))
    classes, folders = _read_classes(root, splits)
    if not classes:
        raise DatasetError(f"no class folders under {root}; expected <split>/<class>/<image>, "
                           "e.g. train/pizza/1.jpg")
    files = {}
    for split in splits:
        present = {p.name for p in (root / split).iterdir() if p.is_dir() and not _hidden(p.name)}
        unknown = sorted(present - set(folders))
        if unknown:
            raise DatasetError(f"{root / split}: class folders {unknown} are not listed in {root / CLASSES_FILE}; "
                               "add them there or remove the folders")
        files[split] = tuple(_list_class(root, split, folder) for folder in folders)
    return ImageFolder(root=root, classes=classes, files=files)


def find_root(folder: Path) -> Path:
    """The folder holding `train/`: the folder itself or its one top-level directory."""
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder; give a folder laid out as <split>/<class>/<image>")
    if (folder / "train").is_dir():
        return folder
    entries = [p for p in folder.iterdir() if not _hidden(p.name) and p.name != "__MACOSX"]
    if len(entries) == 1 and (entries[0] / "train").is_dir():
        return entries[0]
    raise DatasetError(f"no train/ folder in {folder} (found {sorted(p.name for p in entries)}); expected "
                       "<split>/<class>/<image>, e.g. train/pizza/1.jpg and test/pizza/2.jpg")


def cache_entry(source: str, cache_dir: str | Path) -> Path:
    """Where a source's image folder is cached: readable name plus a hash of the whole URI."""
    stem = PurePosixPath(urlparse(source).path).name or urlparse(source).netloc
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", stem)[:40] or "dataset"
    return Path(cache_dir) / "datasets" / f"{slug}-{hashlib.sha256(source.encode()).hexdigest()[:16]}"


def cache_record(source: str, cache_dir: str | Path) -> dict[str, Any]:
    """What was recorded when the source was cached (e.g. the archive's sha256); {} if not cached."""
    path = cache_entry(source, cache_dir) / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def folder_names(classes: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Filesystem-safe, distinct folder names for class names ("T-shirt/top" -> "T-shirt_top")."""
    names = [re.sub(r"[^\w .-]", "_", name).strip() for name in classes]
    names = [name if name.strip(".") else "_" for name in names]
    return tuple(f"{name}_{index}" if names.count(name) > 1 else name for index, name in enumerate(names))


def tfds_splits(source: str, available: list[str], requested: str) -> dict[str, str]:
    """Which TFDS splits become train and test: as requested, else train + test (or validation)."""
    if requested:
        parts = [part.strip() for part in requested.split(",")]
        if len(parts) != 2 or not all(parts):
            raise DatasetError(f"{source}: split={requested!r} must name two TFDS splits, TRAIN,TEST "
                               "(e.g. split=train,validation)")
        return {"train": parts[0], "test": parts[1]}
    if not available:
        # The builder does not list its splits (e.g. under tfds.testing.mock_data): ask for the usual names.
        return {"train": "train", "test": "test"}
    test = next((name for name in ("test", "validation") if name in available), None)
    if "train" not in available or test is None:
        raise DatasetError(f"{source} has splits {sorted(available)}, not train plus test or validation; "
                           "name them: tfds://<name>?split=TRAIN,TEST")
    return {"train": "train", "test": test}


def extract_archive(archive: Path, target: Path) -> None:
    """Extract a zip or tar archive, refusing it whole when any member could write outside `target`.

    Refused before anything is written, too: more members or more uncompressed
    bytes than the deployment's limits, and a tar that ends without its
    end-of-archive marker (a truncated download would otherwise look complete).
    """
    limits = settings.load().limits
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as bundle:
                infos = bundle.infolist()
                _check_archive_size(archive, len(infos), sum(info.file_size for info in infos), limits)
                for info in infos:
                    _check_member(archive, info.filename)
                    if stat.S_ISLNK(info.external_attr >> 16):
                        _refuse(archive, info.filename, "is a symbolic link")
                bundle.extractall(target)
            return
        with tarfile.open(archive, "r:*") as bundle:
            members, size = [], 0
            for member in bundle:
                members.append(member)
                size += member.size
                _check_archive_size(archive, len(members), size, limits)
                _check_member(archive, member.name)
                if member.issym() or member.islnk():
                    _refuse(archive, member.name, f"is a link to {member.linkname!r}")
                if not (member.isfile() or member.isdir()):
                    _refuse(archive, member.name, "is a device, FIFO or other special file")
            # the loop ends at the zero block that closes a tar, or at a short read where the file was cut
            if bundle.fileobj.tell() < bundle.offset + tarfile.BLOCKSIZE:
                raise DatasetError(f"{archive.name}: the tar archive ends without its end-of-archive marker after "
                                   f"{len(members)} members: it is truncated; download it again")
            bundle.extractall(target, members=members, filter="data")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as error:
        raise DatasetError(f"{archive}: not a readable archive ({error}); it may be truncated or damaged: check the "
                           "URL or the file, and download it again") from error


def _check_archive_size(archive: Path, members: int, size: int, limits: settings.Limits) -> None:
    """Refuse an archive whose member count or uncompressed size is above the limits, before extracting it."""
    too_many = limits.exceeded("max_archive_members", members)
    if too_many:
        raise DatasetError(f"{archive.name}: {members:,}+ members, {too_many}; nothing was extracted")
    too_large = limits.exceeded("max_archive_bytes", size)
    if too_large:
        raise DatasetError(f"{archive.name}: {size:,}+ bytes uncompressed, {too_large}; nothing was extracted")


def download(url: str, target: Path) -> None:
    """Stream a URL to a file, logging progress about every 10%.

    A failure on the way (timeout, connection reset, HTTP 5xx or 429, a body
    cut short) is a DownloadError, which the DAG retries; an answer that will
    not change (any other HTTP 4xx, a bad URL, a file above the download limit)
    is a DatasetError.
    """
    limits = settings.load().limits
    shown = redact_uri(url)
    request = urllib.request.Request(url, headers={"User-Agent": "tlpipe"})
    try:
        response = urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S)
    except (OSError, http.client.HTTPException) as error:  # urllib's URLError and HTTPError are OSErrors
        raise _download_error(shown, error) from error
    with response, open(target, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0)
        _check_download_size(shown, total, limits)
        done, next_mark = 0, 10
        while chunk := _read_chunk(shown, response):
            done += len(chunk)
            _check_download_size(shown, done, limits)
            out.write(chunk)
            percent = done * 100 // total if total else 0
            if total and percent >= next_mark:
                log.info("downloading %s: %d%% (%.1f of %.1f MB)", shown, percent, done / 1e6, total / 1e6)
                next_mark = percent // 10 * 10 + 10
            elif not total and done // UNKNOWN_SIZE_LOG_BYTES > (done - len(chunk)) // UNKNOWN_SIZE_LOG_BYTES:
                log.info("downloading %s: %.1f MB", shown, done / 1e6)
    if total and done != total:
        raise DownloadError(f"{shown}: the connection closed after {done:,} of {total:,} bytes; retrying")


def _read_chunk(shown: str, response: http.client.HTTPResponse) -> bytes:
    try:
        return response.read(DOWNLOAD_CHUNK_BYTES)
    except (OSError, http.client.HTTPException) as error:
        raise _download_error(shown, error) from error


def _download_error(shown: str, error: Exception) -> DatasetError | DownloadError:
    """The failure's kind: retried when the server or the network may recover, permanent when the URL is wrong."""
    if isinstance(error, urllib.error.HTTPError):
        if error.code >= 500 or error.code == 429:
            return DownloadError(f"{shown}: HTTP {error.code} {error.reason}: the server is failing or throttling; "
                                 "retrying")
        return DatasetError(f"{shown}: HTTP {error.code} {error.reason}; check the URL")
    if isinstance(error, urllib.error.URLError) and not isinstance(error.reason, OSError):
        return DatasetError(f"{shown}: cannot download ({error.reason}); check the URL")
    return DownloadError(f"{shown}: download failed on the way ({error}); retrying: if it keeps failing, check the "
                         "network and that the host is up")


def _check_download_size(shown: str, size: int, limits: settings.Limits) -> None:
    too_large = limits.exceeded("max_download_bytes", size)
    if too_large:
        raise DatasetError(f"{shown}: {size:,}+ bytes to download, {too_large}")


def _download_s3(source: str, local: Path) -> Path:
    """storage.download of an object or a prefix (ending in "/"), refused up front above the download limit."""
    size = sum(item.size for item in storage.list_stored(source) if source.endswith("/") or item.uri == source)
    _check_download_size(redact_uri(source), size, settings.load().limits)
    return storage.download(source, local)


def _cached(source: str, cache_dir: str | Path, sha256: str, build: Callable[[Path], tuple[Path, dict]]) -> Path:
    """Return the cached folder of a source, building it first on a miss (or a changed checksum)."""
    entry = cache_entry(source, cache_dir)
    record = cache_record(source, cache_dir)
    shown = redact_uri(source)
    if record and (not sha256 or record.get("sha256") == sha256):
        log.info("dataset cache hit for %s: %s", shown, entry / IMAGES_DIR)
        return entry / IMAGES_DIR
    with scratch_dir("acquire", entry.parent) as work:
        root, info = build(work)
        staged = work / "entry"
        staged.mkdir()
        root.rename(staged / IMAGES_DIR)
        (staged / RECORD_FILE).write_text(json.dumps({"source": shown, **info}, indent=2, sort_keys=True))
        if entry.exists():
            shutil.rmtree(entry)
        try:
            staged.rename(entry)
        except OSError:
            if not (entry / RECORD_FILE).is_file():
                raise
            log.info("another process cached %s first; using its copy", shown)
    log.info("cached %s at %s", shown, entry / IMAGES_DIR)
    return entry / IMAGES_DIR


def _archive_folder(source: str, sha256: str, work: Path) -> tuple[Path, dict]:
    scheme = urlparse(source).scheme
    if scheme in ("http", "https"):
        archive = work / PurePosixPath(urlparse(source).path).name
        download(source, archive)
    elif scheme == "s3":
        archive = _download_s3(source, work / PurePosixPath(urlparse(source).path).name)
    else:
        archive = storage.local_path(source)
        if not archive.is_file():
            raise DatasetError(f"{source}: no such archive file")
    digest = storage.sha256_file(archive)
    if sha256 and digest != sha256.lower():
        raise DatasetError(f"{redact_uri(source)}: sha256 is {digest}, expected {sha256}; the download is corrupt "
                           "or the archive changed: check the URL, or update source_sha256 if the change is intended")
    extract_archive(archive, work / "extracted")
    log.info("extracted %s (sha256 %s)", redact_uri(source), digest)
    return find_root(work / "extracted"), {"sha256": digest}


def _s3_folder(source: str, work: Path) -> tuple[Path, dict]:
    download_dir = _download_s3(source.rstrip("/") + "/", work / "download")
    return find_root(download_dir), {}


def _tfds_folder(source: str, cache_dir: str | Path, work: Path) -> tuple[Path, dict]:
    import tensorflow_datasets as tfds

    parsed = urlparse(source)
    name = (parsed.netloc + parsed.path).strip("/")
    try:
        builder = tfds.builder(name, data_dir=str(Path(cache_dir) / "tfds"))
    except tfds.core.registered.DatasetNotFoundError as error:
        raise DatasetError(f"{source}: no TFDS dataset {name!r}; check the name in the TFDS catalog") from error
    builder.download_and_prepare()
    keys = builder.info.supervised_keys
    if not (isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(key, str) for key in keys)):
        raise DatasetError(f"{source}: the dataset has no (image, label) supervised keys; use an image "
                           "classification dataset")
    image_key, label_key = keys
    classes = tuple(builder.info.features[label_key].names)
    folders = folder_names(classes)
    splits = tfds_splits(source, list(builder.info.splits.keys()), parse_qs(parsed.query).get("split", [""])[0])
    root = work / IMAGES_DIR
    for split, tfds_split in splits.items():
        dataset = builder.as_dataset(split=tfds_split, shuffle_files=False,
                                     decoders={image_key: tfds.decode.SkipDecoding()})
        for index, example in enumerate(tfds.as_numpy(dataset)):
            data = example[image_key]
            path = root / split / folders[int(example[label_key])] / f"{index:06d}{_image_suffix(data)}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    _write_classes(root, classes, folders)
    return root, {}


def _idx_folder(source: str, work: Path) -> tuple[Path, dict]:
    """Decode the four IDX files and write every image as a PNG (once; the cache keeps them)."""
    from concurrent.futures import ThreadPoolExecutor

    parsed = urlparse(source)
    spec = IDX_DATASETS.get(parsed.netloc)
    if spec is None:
        raise DatasetError(f"{source}: no IDX dataset {parsed.netloc!r}; known: {sorted(IDX_DATASETS)}")
    folder = parse_qs(parsed.query).get("dir", [""])[0]
    folders = folder_names(spec.classes)
    root = work / IMAGES_DIR
    for split, images_file, labels_file in (("train", spec.train_images, spec.train_labels),
                                            ("test", spec.test_images, spec.test_labels)):
        images = _idx_array(_idx_content(spec, images_file, folder, work), images_file.name)
        labels = _idx_array(_idx_content(spec, labels_file, folder, work), labels_file.name)
        if images.ndim != 3 or labels.shape != images.shape[:1] or labels.max(initial=0) >= len(spec.classes):
            raise DatasetError(f"{source}: {images_file.name} {images.shape} and {labels_file.name} {labels.shape} "
                               f"do not pair up as images and labels of {len(spec.classes)} classes")
        for name in folders:
            (root / split / name).mkdir(parents=True)
        paths = [root / split / folders[label] / f"{index:05d}.png" for index, label in enumerate(labels)]
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            list(pool.map(_write_png, paths, images))
    _write_classes(root, spec.classes, folders)
    return root, {}


def _idx_content(spec: IdxDataset, file: IdxFile, folder: str, work: Path) -> bytes:
    """The decompressed, checksum-verified bytes of one IDX file: local copy first, else download."""
    local = Path(folder or spec.local_dir) / file.name
    if local.is_file():
        path = local
    elif folder:
        raise DatasetError(f"{local} is missing; the folder given by ?dir= must hold the IDX .gz files")
    else:
        url = spec.base_url + file.name
        path = work / file.name
        download(url, path)
        digest = storage.sha256_file(path)
        if digest != file.download_sha256:
            raise DatasetError(f"{url}: sha256 is {digest}, expected {file.download_sha256}; the download is "
                               "corrupt, try again")
    try:
        content = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as error:
        raise DatasetError(f"{path}: not a readable .gz file ({error}); replace it") from error
    digest = hashlib.sha256(content).hexdigest()
    if digest != file.sha256:
        raise DatasetError(f"{path}: sha256 of its content is {digest}, expected {file.sha256}; the file is "
                           "corrupt or another dataset's: replace it (e.g. reinstall dataset-fashion-mnist)")
    return content


def _idx_array(data: bytes, name: str):
    """Parse IDX bytes (big-endian dims, unsigned bytes) into a numpy array."""
    import numpy as np

    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise DatasetError(f"{name}: not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    values = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if values.size != math.prod(dims):
        raise DatasetError(f"{name}: header says {dims} but holds {values.size} values; the file is truncated")
    return values.reshape(dims)


def _write_png(path: Path, pixels) -> None:
    from PIL import Image

    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format="PNG")
    path.write_bytes(encoded.getvalue())


def _write_classes(root: Path, classes: tuple[str, ...], folders: tuple[str, ...]) -> None:
    (root / CLASSES_FILE).write_text(json.dumps({"classes": list(classes), "folders": list(folders)}, indent=2))


def _read_classes(root: Path, splits: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    path = root / CLASSES_FILE
    if not path.is_file():
        folders = sorted({p.name for split in splits for p in (root / split).iterdir()
                          if p.is_dir() and not _hidden(p.name)})
        return tuple(folders), tuple(folders)
    try:
        listed = json.loads(path.read_text())
        classes, folders = tuple(listed["classes"]), tuple(listed["folders"])
    except (ValueError, KeyError, TypeError) as error:
        raise DatasetError(f"{path}: expected {{\"classes\": [...], \"folders\": [...]}} ({error})") from error
    if not all(isinstance(name, str) for name in classes + folders):
        raise DatasetError(f"{path}: class and folder names must be strings; write them in quotes")
    if len(classes) != len(folders) or len(set(classes)) != len(classes) or len(set(folders)) != len(folders):
        raise DatasetError(f"{path}: {len(classes)} classes and {len(folders)} folders; list each class once, "
                           "with one folder of its own")
    for folder in folders:
        reason = storage.escape_reason(folder) or ("has a '/'" if "/" in folder else "")
        if reason:
            raise DatasetError(f"{path}: folder {folder!r} {reason}, so it could point outside {root}; list the "
                               "plain name of each class folder directly below <split>/ (e.g. \"T-shirt_top\")")
    return classes, folders


def _list_class(root: Path, split: str, folder: str) -> tuple[str, ...]:
    directory = root / split / folder
    if not directory.is_dir():
        return ()
    return tuple(sorted(f"{split}/{folder}/{entry.name}" for entry in os.scandir(directory)
                        if entry.is_file() and not _hidden(entry.name)))


def _check_member(archive: Path, name: str) -> None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or re.match(r"^[A-Za-z]:[\\/]", name) or ".." in path.parts:
        _refuse(archive, name, "would be written outside the extraction folder")


def _refuse(archive: Path, member: str, why: str) -> None:
    raise DatasetError(f"{archive.name}: archive member {member!r} {why}; the archive is refused and nothing was "
                       "extracted: use an archive of plain files and folders")


def _is_archive(source: str) -> bool:
    return urlparse(source).path.lower().endswith(ARCHIVE_SUFFIXES)


def _image_suffix(data: bytes) -> str:
    return next((suffix for magic, suffix in IMAGE_MAGIC if data.startswith(magic)), ".img")


def _hidden(name: str) -> bool:
    return name.startswith(".")
