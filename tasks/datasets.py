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
- `conn://<connection id>`: one of the above, with its credentials, kept in an
  Airflow connection; the DAG resolves it in the task (`connection_source`).

Everything that is downloaded or converted lives in the cache under a key
derived from the source URI and, for an s3:// prefix or an archive in S3 or on
disk, from its listing (key, size, ETag / modification time): a changed listing
is a new entry, for which only the changed objects are downloaded (the rest is
linked from the previous entry), and an unchanged one a cache hit that fetches
nothing. A folder is read in place. acquire records the content's `snapshot`,
so a worker that materialises the source again, or reads a folder that changed
since, refuses data other than what acquire indexed. An http(s) archive is
re-fetched only when `sha256` changes. Each cache entry is built in a scratch
folder and renamed into place, so a failed or refused fetch leaves nothing behind.
Downloads stop at the deployment's download limit and at the disk's free space
(TLP_MIN_FREE_BYTES); archives also at a compression ratio (TLP_MAX_COMPRESSION_RATIO). A failure that may pass (a
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
from urllib.parse import parse_qs, quote, urlparse, urlsplit, urlunsplit

from tasks import artifacts, settings, storage
from tasks.errors import DatasetError, DownloadError
from tasks.redact import redact_uri
from tasks.scratch import atomic_file, scratch_dir

if TYPE_CHECKING:
    from tasks.config import RunConfig

log = logging.getLogger(__name__)

SUPPORTED_SOURCES = (
    "tfds://<name>[?split=TRAIN,TEST]",
    "http(s)://…/<archive> (.zip, .tar, .tar.gz, .tgz, .tar.bz2, .tar.xz)",
    "a local path, file:// or s3:// URI of such an archive",
    "a local folder or file://<folder> laid out as <split>/<class>/<image>",
    "s3://<bucket>/<prefix>/ laid out as <split>/<class>/<image>",
    "idx://fashion_mnist, optionally ?dir=<folder with the IDX .gz files>",
    "conn://<Airflow connection id> whose extra {\"url\": …} (or host) is one of these, its login and password "
    "the URL's credentials",
)
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
CLASSES_FILE = "classes.json"
CONNECTION_SCHEME = "conn://"
IMAGES_DIR = "images"
RECORD_FILE = "source.json"
DOWNLOAD_CHUNK_BYTES = 1 << 16
DOWNLOAD_TIMEOUT_S = 60
UNKNOWN_SIZE_LOG_BYTES = 10 << 20
RATIO_FREE_BYTES = 1 << 20  # members this small may compress as well as they like
IMAGE_MAGIC = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG", ".png"), (b"GIF8", ".gif"), (b"BM", ".bmp"),
               (b"RIFF", ".webp"), (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"))


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
    skipped: tuple[dict[str, str], ...] = ()  # {"path", "reason"} of entries that cannot be dataset files

    def counts(self) -> dict[str, dict[str, int]]:
        return {split: {name: len(paths) for name, paths in zip(self.classes, per_class, strict=False)}
                for split, per_class in self.files.items()}


def local_dataset(source: str, cache_dir: str | Path, sha256: str = "") -> Path:
    """The local root of a source's image folder, fetched into the cache when needed."""
    scheme = urlparse(source).scheme
    if _is_archive(source):
        return _cached(source, cache_dir, sha256, lambda work, _: _archive_folder(source, sha256, work),
                       _archive_version(source))
    if sha256:
        raise DatasetError(f"source_sha256 is given but {redact_uri(source)} is not an archive; checksums are "
                           "checked for archive sources only, so leave source_sha256 empty")
    if scheme in ("", "file"):
        return find_root(storage.local_path(source))
    if scheme == "s3":
        listing = _s3_listing(source)
        return _cached(source, cache_dir, "", lambda work, previous: _s3_folder(source, work, listing, previous),
                       _digest(listing))
    if scheme == "tfds":
        return _cached(source, cache_dir, "", lambda work, _: _tfds_folder(source, cache_dir, work))
    if scheme == "idx":
        return _cached(source, cache_dir, "", lambda work, _: _idx_folder(source, work))
    if scheme == "conn":
        raise DatasetError(f"{source}: a conn:// source is resolved by the DAG from its Airflow connection; outside "
                           "Airflow give the URL itself")
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
    return indexed_folder(storage.read_json(uri), cfg.source, cfg.cache_dir, cfg.source_sha256)


def source_index(source: str, cache_dir: str | Path, sha256: str = "") -> dict[str, Any]:
    """Fetch a source into the cache and describe it for an acquire index: where its images are (on this worker),
    its classes in label order, every file per split and class, and what identifies its content."""
    root = local_dataset(source, cache_dir, sha256)
    folder = scan(root)
    return {
        "source": redact_uri(source),
        "root": str(root),
        "classes": list(folder.classes),
        "files": {split: [list(paths) for paths in per_class] for split, per_class in folder.files.items()},
        "counts": folder.counts(),
        "skipped": list(folder.skipped),
        "sha256": entry_record(root).get("sha256", ""),
        "snapshot": snapshot(root),
    }


def indexed_folder(index: dict[str, Any], source: str, cache_dir: str | Path, sha256: str = "") -> ImageFolder:
    """The ImageFolder an acquire index entry describes, its root readable on this worker (`source` is the real,
    unredacted URI the entry was made from)."""
    root = Path(index["root"])
    if not root.is_dir():
        log.info("dataset root %s is not on this worker; materialising %s into its cache", root, index["source"])
        root = local_dataset(source, cache_dir, sha256)
    now = snapshot(root)
    if now != index.get("snapshot", now):
        raise DatasetError(f"{index['source']} changed after acquire indexed it (snapshot {index['snapshot']}, now "
                           f"{now}): this run cannot see the data it selected from; trigger a new run")
    files = {split: tuple(tuple(paths) for paths in per_class) for split, per_class in index["files"].items()}
    return ImageFolder(root=root, classes=tuple(index["classes"]), files=files,
                       skipped=tuple(index.get("skipped", ())))


def connection_id(source: str) -> str:
    """The Airflow connection a `conn://<id>` source names; "" for any other source."""
    if not source.startswith(CONNECTION_SCHEME):
        return ""
    conn_id = source[len(CONNECTION_SCHEME):]
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", conn_id):
        raise DatasetError(f"source {source!r}: write conn://<connection id> (letters, digits, _ . -)")
    return conn_id


def connection_source(source: str, conn_type: str | None, host: str | None, login: str | None,
                      password: str | None, port: int | None, schema: str | None, extra: dict[str, Any]) -> str:
    """The real source URL of a `conn://` source, from its Airflow connection's fields.

    The URL is the connection's extra `url` (else its host); a login and
    password, when set, become the URL's user info. Resolved in the task's own
    process only, so the credentials stay in the connection, out of XCom and logs.
    """
    url = str(extra.get("url") or host or "").strip()
    if not url or "://" not in url or url.startswith(CONNECTION_SCHEME):
        raise DatasetError(f"source {source}: its connection holds no dataset URL; set the connection's extra to "
                           '{"url": "<source URI>"} (any form but conn://) or its host to that URI')
    if login or password:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or "@" in parts.netloc:
            raise DatasetError(f"source {source}: a login/password is added to an http(s) URL without user info "
                               f"only, not to {redact_uri(url)}; for s3:// use the model store connection")
        userinfo = quote(login or "", safe="") + (":" + quote(password, safe="") if password else "")
        url = urlunsplit(parts._replace(netloc=f"{userinfo}@{parts.netloc}"))
    return url


def scan(root: Path) -> ImageFolder:
    """List a dataset root's classes and files; `classes.json`, when present, fixes names and order.

    A file or folder whose name is not valid UTF-8 is no dataset file: it is
    left out and listed in `skipped` with the reason, under a printable name.
    """
    skipped: list[dict[str, str]] = []
    splits = sorted(p.name for p in _entries_named(root, skipped, root) if p.is_dir() and not _hidden(p.name))
    classes, folders = _read_classes(root, splits, skipped)
    if not classes:
        raise DatasetError(f"no class folders under {root}; expected <split>/<class>/<image>, "
                           "e.g. train/pizza/1.jpg")
    files = {}
    for split in splits:
        present = {p.name for p in _entries_named(root / split, skipped, root) if p.is_dir() and not _hidden(p.name)}
        unknown = sorted(present - set(folders))
        if unknown:
            raise DatasetError(f"{root / split}: class folders {unknown} are not listed in {root / CLASSES_FILE}; "
                               "add them there or remove the folders")
        files[split] = tuple(_list_class(root, split, folder, skipped) for folder in folders)
    if skipped:
        log.warning("%s: left out %d entries whose names are not valid UTF-8, e.g. %s", root, len(skipped),
                    skipped[0]["path"])
    return ImageFolder(root=root, classes=classes, files=files, skipped=tuple(skipped))


def find_root(folder: Path) -> Path:
    """The folder holding `train/` (or only `test/`, as a test source may): the folder itself or its one top-level
    directory."""
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder; give a folder laid out as <split>/<class>/<image>")
    if _has_split(folder):
        return folder
    entries = [p for p in folder.iterdir() if not _hidden(p.name) and p.name != "__MACOSX"]
    if len(entries) == 1 and _has_split(entries[0]):
        return entries[0]
    raise DatasetError(f"no train/ folder in {folder} (found {sorted(p.name for p in entries)}); expected "
                       "<split>/<class>/<image>, e.g. train/pizza/1.jpg and test/pizza/2.jpg (a test_source needs "
                       "test/ only)")


def _has_split(folder: Path) -> bool:
    return (folder / "train").is_dir() or (folder / "test").is_dir()


def cache_entry(source: str, cache_dir: str | Path, version: str = "") -> Path:
    """Where a source's image folder is cached: readable name, a hash of the whole URI, and the content's version.

    A version (a digest of the source's listing) gives each content its own
    entry, never changed once made: a run that reads one is not disturbed when
    the next run caches newer content.
    """
    stem = PurePosixPath(_source_path(source)).name or urlparse(source).netloc
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", stem)[:40] or "dataset"
    name = f"{slug}-{hashlib.sha256(source.encode()).hexdigest()[:16]}"
    return Path(cache_dir) / "datasets" / (f"{name}-{version}" if version else name)


def cache_record(source: str, cache_dir: str | Path) -> dict[str, Any]:
    """What was recorded when the source was last cached (e.g. the archive's sha256); {} if not cached."""
    entries = _entries(source, cache_dir)
    return json.loads((entries[-1] / RECORD_FILE).read_text()) if entries else {}


def entry_record(root: Path) -> dict[str, Any]:
    """What was recorded with the cache entry whose images are `root`; {} for a folder used in place."""
    record = root.parent / RECORD_FILE
    in_cache = root.name == IMAGES_DIR and root.parent.parent.name == "datasets"
    return json.loads(record.read_text()) if in_cache and record.is_file() else {}


def snapshot(root: Path) -> str:
    """What identifies the content of a dataset root: its cache entry's version, or a folder's listing digest.

    A folder used in place has no entry: its digest is of every file's path,
    size and modification time, so a changed, added or removed file changes it.
    """
    record = entry_record(root)
    if record:
        return record.get("snapshot", "")
    listing = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            try:
                info = os.stat(path)
                listing.append([os.path.relpath(path, root), info.st_size, info.st_mtime_ns])
            except OSError:  # a dangling link: no content, but its presence still counts
                listing.append([os.path.relpath(path, root), -1, 0])
    return _digest(sorted(listing))


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
    packed = archive.stat().st_size
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as bundle:
                infos = bundle.infolist()
                _check_archive_size(archive, len(infos), sum(info.file_size for info in infos), limits)
                for info in infos:
                    _check_member(archive, info.filename)
                    if stat.S_ISLNK(info.external_attr >> 16):
                        _refuse(archive, info.filename, "is a symbolic link")
                    _check_ratio(archive, info.filename, info.file_size, info.compress_size, limits)
                _check_free_space(archive.name, target, sum(info.file_size for info in infos), limits)
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
                # a tar is compressed as one stream: the members so far against the whole archive's bytes
                _check_ratio(archive, member.name, size, packed, limits)
            # the loop ends at the zero block that closes a tar, or at a short read where the file was cut
            if bundle.fileobj.tell() < bundle.offset + tarfile.BLOCKSIZE:
                raise DatasetError(f"{archive.name}: the tar archive ends without its end-of-archive marker after "
                                   f"{len(members)} members: it is truncated; download it again")
            _check_free_space(archive.name, target, size, limits)
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


def _check_ratio(archive: Path, member: str, unpacked: int, packed: int, limits: settings.Limits) -> None:
    """Refuse a member that expands far more than images do (a compression bomb), before extracting anything."""
    if unpacked <= RATIO_FREE_BYTES:
        return
    too_dense = limits.exceeded("max_compression_ratio", unpacked // max(packed, 1))
    if too_dense:
        _refuse(archive, member, f"expands {unpacked:,} bytes from {packed:,} (ratio {unpacked // max(packed, 1):,}), "
                f"{too_dense}")


def _check_free_space(what: str, target: Path, needed: int, limits: settings.Limits) -> None:
    """Refuse to write `needed` bytes below `target` when that would leave less than the deployment keeps free."""
    folder = target
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free - needed < limits.min_free_bytes:
        raise DatasetError(f"{what}: {needed:,} bytes to write but {free:,} free on the disk of {folder}, and "
                           f"{limits.min_free_bytes:,} must stay free (TLP_MIN_FREE_BYTES); nothing was written: free "
                           "space (e.g. clear the dataset cache, TLP_CACHE_DIR) or use a smaller dataset")


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
    with response, atomic_file(target) as out:
        total = int(response.headers.get("Content-Length") or 0)
        _check_download_size(shown, total, limits)
        _check_free_space(shown, target.parent, total, limits)
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
    """storage.download of one object, refused up front above the download limit or the disk's free space."""
    size = sum(item.size for item in storage.list_stored(source) if item.uri == source)
    limits = settings.load().limits
    _check_download_size(redact_uri(source), size, limits)
    _check_free_space(redact_uri(source), local, size, limits)
    return storage.download(source, local)


def _cached(source: str, cache_dir: str | Path, sha256: str,
            build: Callable[[Path, Path | None], tuple[Path, dict]], version: str = "") -> Path:
    """Return the cached folder of a source's content `version`, building it first on a miss (or a changed checksum).

    `build` gets a scratch folder and the newest earlier entry of the source
    (or None), from which it may reuse what did not change. Entries of the
    source other than this one and the one before it are removed afterwards.
    """
    entry = cache_entry(source, cache_dir, version)
    record = json.loads((entry / RECORD_FILE).read_text()) if (entry / RECORD_FILE).is_file() else {}
    shown = redact_uri(source)
    if record and (not sha256 or record.get("sha256") == sha256):
        log.info("dataset cache hit for %s: %s", shown, entry / IMAGES_DIR)
        return entry / IMAGES_DIR
    previous = next((old for old in reversed(_entries(source, cache_dir)) if old != entry), None)
    with scratch_dir("acquire", entry.parent) as work:
        root, info = build(work, previous)
        staged = work / "entry"
        staged.mkdir()
        root.rename(staged / IMAGES_DIR)
        (staged / RECORD_FILE).write_text(json.dumps({"source": shown, "snapshot": version, **info}, indent=2,
                                                     sort_keys=True))
        if entry.exists():
            shutil.rmtree(entry)
        try:
            staged.rename(entry)
        except OSError:
            if not (entry / RECORD_FILE).is_file():
                raise
            log.info("another process cached %s first; using its copy", shown)
    for old in _entries(source, cache_dir)[:-2]:
        if old != entry:
            shutil.rmtree(old, ignore_errors=True)
    log.info("cached %s at %s", shown, entry / IMAGES_DIR)
    return entry / IMAGES_DIR


def _entries(source: str, cache_dir: str | Path) -> list[Path]:
    """The complete cache entries of a source, oldest first."""
    base = cache_entry(source, cache_dir)
    found = [base, *base.parent.glob(f"{base.name}-*")] if base.parent.is_dir() else []
    complete = [(entry / RECORD_FILE) for entry in found if (entry / RECORD_FILE).is_file()]
    return [record.parent for record in sorted(complete, key=lambda record: record.stat().st_mtime_ns)]


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _s3_listing(source: str) -> list[list]:
    """[relative key, size, ETag] of every object below an s3:// prefix: what identifies its content."""
    prefix = source.rstrip("/") + "/"
    listing = [[item.uri[len(prefix):], item.size, item.version] for item in storage.list_stored(prefix)
               if not item.uri.endswith("/")]  # keys ending in "/" are folder markers, not files
    if not listing:
        raise DatasetError(f"{redact_uri(source)}: nothing below this prefix; upload the image folder "
                           "(<split>/<class>/<image>) there or fix the URI")
    for key, _, _ in listing:
        reason = storage.escape_reason(key)
        if reason:
            raise DatasetError(f"{redact_uri(prefix + key)}: the key below {redact_uri(prefix)} {reason}, so it would "
                               "be written outside the cache; nothing was downloaded: rename or delete that object")
    return listing


def _archive_version(source: str) -> str:
    """For an archive in S3 or on disk, a digest of its size and ETag / modification time; "" for http(s)."""
    if storage.is_s3(source):
        found = [item for item in storage.list_stored(source) if item.uri == source]
        return _digest([[item.size, item.version] for item in found]) if found else ""
    if urlparse(source).scheme in ("", "file"):
        path = storage.local_path(source)
        return _digest([path.stat().st_size, path.stat().st_mtime_ns]) if path.is_file() else ""
    return ""


def _archive_folder(source: str, sha256: str, work: Path) -> tuple[Path, dict]:
    scheme = urlparse(source).scheme
    if scheme in ("http", "https"):
        archive = work / PurePosixPath(_source_path(source)).name
        download(source, archive)
    elif scheme == "s3":
        archive = _download_s3(source, work / PurePosixPath(_source_path(source)).name)
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


def _s3_folder(source: str, work: Path, listing: list[list], previous: Path | None) -> tuple[Path, dict]:
    """Download the objects below a prefix; those the previous entry holds unchanged (key, size, ETag) are linked
    from it instead."""
    prefix = source.rstrip("/") + "/"
    limits = settings.load().limits
    _check_download_size(redact_uri(prefix), sum(size for _, size, _ in listing), limits)
    old = json.loads((previous / RECORD_FILE).read_text()) if previous else {}
    unchanged = {tuple(item) for item in old.get("listing", [])}
    download = work / "download"
    fetch = []
    for key, size, version in listing:
        target = download / key
        target.parent.mkdir(parents=True, exist_ok=True)
        reused = _kept_copy(previous, old.get("top"), key) if (key, size, version) in unchanged else None
        if reused is None:
            fetch.append((key, size))
        else:
            try:
                os.link(reused, target)
            except OSError:  # a filesystem without hard links
                shutil.copy2(reused, target)
    _check_free_space(redact_uri(prefix), download, sum(size for _, size in fetch), limits)
    for key, _ in fetch:
        storage.download(prefix + key, download / key)
    if fetch or not previous:
        log.info("downloaded %d of %d files of %s (%d unchanged since the last copy)", len(fetch), len(listing),
                 redact_uri(prefix), len(listing) - len(fetch))
    root = find_root(download)
    return root, {"listing": listing, "top": root.relative_to(download).as_posix()}


def _kept_copy(previous: Path | None, top: str | None, key: str) -> Path | None:
    """The file an earlier entry made of `key`, if it kept one (files outside the dataset root are not kept)."""
    if previous is None or top is None:
        return None
    if top not in ("", "."):
        if not key.startswith(top + "/"):
            return None
        key = key[len(top) + 1:]
    path = previous / IMAGES_DIR / key
    return path if path.is_file() else None


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


def _read_classes(root: Path, splits: list[str], skipped: list[dict[str, str]]
                  ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    path = root / CLASSES_FILE
    if not path.is_file():
        folders = sorted({p.name for split in splits for p in _entries_named(root / split, skipped, root)
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


def _list_class(root: Path, split: str, folder: str, skipped: list[dict[str, str]]) -> tuple[str, ...]:
    directory = root / split / folder
    if not directory.is_dir():
        return ()
    return tuple(sorted(f"{split}/{folder}/{entry.name}" for entry in _entries_named(directory, skipped, root)
                        if entry.is_file() and not _hidden(entry.name)))


def _entries_named(directory: Path, skipped: list[dict[str, str]], root: Path) -> list[Path]:
    """The entries of a folder whose names are valid UTF-8; the others are added to `skipped`, with the reason."""
    named = []
    for entry in directory.iterdir():
        try:
            entry.name.encode("utf-8")
        except UnicodeEncodeError:  # os.listdir gives undecodable bytes as surrogates
            shown = os.fsencode(entry.relative_to(root)).decode("utf-8", "backslashreplace")
            found = {"path": shown, "reason": "the name is not valid UTF-8; rename it to use it"}
            if found not in skipped:
                skipped.append(found)
            continue
        named.append(entry)
    return named


def _check_member(archive: Path, name: str) -> None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or re.match(r"^[A-Za-z]:[\\/]", name) or ".." in path.parts:
        _refuse(archive, name, "would be written outside the extraction folder")


def _refuse(archive: Path, member: str, why: str) -> None:
    raise DatasetError(f"{archive.name}: archive member {member!r} {why}; the archive is refused and nothing was "
                       "extracted: use an archive of plain files and folders")


def _is_archive(source: str) -> bool:
    return _source_path(source).lower().endswith(ARCHIVE_SUFFIXES)


def _source_path(source: str) -> str:
    """The path part of a source: an S3 key and a local path are taken whole (`?` and `#` are name characters)."""
    if storage.is_s3(source):
        return "/" + storage.split_s3(source)[1]
    if "://" not in source:
        return source
    return urlparse(source).path


def _image_suffix(data: bytes) -> str:
    return next((suffix for magic, suffix in IMAGE_MAGIC if data.startswith(magic)), ".img")


def _hidden(name: str) -> bool:
    return name.startswith(".")
