"""Read, write, list and copy under local paths, `file://` URIs and `s3://` URIs.

The only module that knows about object storage. S3 settings come from the
standard AWS environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`), so the same code talks to AWS,
MinIO or SeaweedFS; inside Airflow the DAG exports them from a connection.
TensorFlow needs local files, so steps stage in with `download` and out with
`upload`.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Mapping

from tasks import settings
from tasks.errors import StorageError, StoreUnavailableError
from tasks.redact import redact_uri
from tasks.scratch import atomic_file

log = logging.getLogger(__name__)

S3_RETRY_ATTEMPTS = settings.load().s3_retry_attempts
S3_TIMEOUT_S = 10



def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join path segments onto a local path or URI without doubling slashes."""
    base = str(base)
    cleaned = [str(p).strip("/") for p in parts if str(p).strip("/")]
    if is_s3(base) or base.startswith("file://"):
        return "/".join([base.rstrip("/"), *cleaned])
    return str(Path(base, *cleaned))


def local_path(uri: str) -> Path:
    """The filesystem path of a local path or `file://` URI.

    A `file://` URI is taken whole: a `?` or `#` in it (which URI syntax would
    cut off, turning `file:///proc/self/environ#/run/metrics.json` into
    `/proc/self/environ`) or a host other than localhost is refused, never
    silently dropped. A plain path may hold any character.
    """
    uri = str(uri)
    if is_s3(uri):
        raise StorageError(f"{uri} is not a local path; download it first")
    if not uri.startswith("file://"):
        return Path(uri)
    host, slash, path = uri[len("file://"):].partition("/")
    if "?" in uri or "#" in uri:
        raise StorageError(f"{redact_uri(uri)}: a file:// URI may not contain '?' or '#' (they would cut the path "
                           "short); give the plain path instead of a file:// URI")
    if host not in ("", "localhost") or not slash:
        raise StorageError(f"{redact_uri(uri)}: a file:// URI names a path on this machine, file:///<absolute path>; "
                           f"{host!r} would be read as a host and dropped")
    return Path("/" + path)


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/key/part` -> ("bucket", "key/part"); everything after the bucket is key, `?` and `#` included."""
    bucket, _, key = str(uri)[len("s3://"):].partition("/")
    if not is_s3(uri) or not bucket or any(char in bucket for char in "?#@"):
        raise StorageError(f"{redact_uri(str(uri))} has no valid bucket; write s3://<bucket>/<prefix>")
    return bucket, key


def s3_client(env: Mapping[str, str] | None = None):
    """A boto3 S3 client for the endpoint and credentials in `env` (AWS_* names; default: this process's
    environment)."""
    env = os.environ if env is None else env
    return _client(env.get("AWS_ENDPOINT_URL"), env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY"),
                   env.get("AWS_DEFAULT_REGION", "us-east-1"))


@functools.lru_cache(maxsize=8)
def _client(endpoint: str | None, access_key: str | None, secret_key: str | None, region: str):
    """One client per settings; a fresh session so changed credentials are never served stale."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": S3_RETRY_ATTEMPTS, "mode": "standard"},
        connect_timeout=S3_TIMEOUT_S,
        read_timeout=60,
        s3={"addressing_style": "path"},
    )
    session = boto3.session.Session(aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                                    region_name=region)
    return session.client("s3", endpoint_url=endpoint, config=config)


THROTTLED = ("SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
             "ServiceUnavailable", "InternalError", "503", "500", "502", "504")


def _s3_error(uri: str, error: Exception) -> StorageError | StoreUnavailableError:
    """Translate botocore failures into an error that says what to fix, of the kind that says whether to retry."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default AWS endpoint")
    uri = redact_uri(uri)
    if isinstance(error, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError)):
        return StoreUnavailableError(f"{uri}: cannot reach S3 endpoint {endpoint} after {S3_RETRY_ATTEMPTS} attempts; "
                            "check that the store is running and AWS_ENDPOINT_URL (or the Airflow connection) is right")
    if isinstance(error, NoCredentialsError):
        return StorageError(f"{uri}: no S3 credentials; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                            "or the Airflow connection")
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            return StorageError(f"{uri}: access denied by {endpoint} ({code}); check the S3 access key and secret")
        if code == "NoSuchBucket":
            return StorageError(f"{uri}: bucket {split_s3(uri)[0]!r} does not exist at {endpoint}; create it first")
        if code in ("NoSuchKey", "404", "NotFound"):
            return StorageError(f"{uri}: no such object")
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in THROTTLED or status >= 500 or status == 429:
            return StoreUnavailableError(f"{uri}: {endpoint} is unavailable ({code or status}); retrying later")
        return StorageError(f"{uri}: S3 error {code}: {error}")
    return StorageError(f"{uri}: {error}")


def _s3_call(uri: str, fn, *args, **kwargs):
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(*args, **kwargs)
    except (BotoCoreError, ClientError) as error:
        raise _s3_error(uri, error) from error


def exists(uri: str) -> bool:
    """True for an existing file/object, or a directory/prefix with something below it."""
    if not is_s3(uri):
        return local_path(uri).exists()
    return exists_object(uri) or bool(list_files(uri.rstrip("/") + "/"))


def read_bytes(uri: str) -> bytes:
    if not is_s3(uri):
        return _read_local(local_path(uri), uri)
    bucket, key = split_s3(uri)
    response = _s3_call(uri, s3_client().get_object, Bucket=bucket, Key=key)
    return response["Body"].read()


def _read_local(path: Path, uri: str) -> bytes:
    """A local file's bytes, opened non-blocking and refused unless it is a regular file (a FIFO or device put where
    a file was listed cannot hang the reader); an OS error is a StorageError naming the file."""
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such file") from None
    except OSError as error:
        raise StorageError(f"{uri}: {error.strerror or error}") from error
    try:
        if not stat.S_ISREG(os.fstat(handle).st_mode):
            raise StorageError(f"{uri}: no such file (not a regular file)")
        with open(handle, "rb", buffering=0, closefd=False) as file:
            return file.read()
    except OSError as error:
        raise StorageError(f"{uri}: {error.strerror or error}") from error
    finally:
        os.close(handle)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object: one PUT on S3, write-then-rename locally (never half-written)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _s3_call(uri, s3_client().put_object, Bucket=bucket, Key=key, Body=data)
        return
    with atomic_file(local_path(uri)) as out:
        out.write(data)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, value: Any) -> None:
    """Stable JSON (sorted keys, fixed indent) so equal content gives equal bytes."""
    write_text(uri, json.dumps(value, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class StoredFile:
    """One file below a prefix, with what changes when its content changes."""

    uri: str
    size: int
    version: str  # the S3 ETag; a local file's modification time in ns


def local_files(folder: str | Path) -> Iterator[os.DirEntry]:
    """Every file below a local folder, from one scandir per folder instead of a stat per file (thousands of
    images or feature-store entries): a link to a file is a file, a linked folder is not entered, and a subfolder
    this process may not read is passed over with a warning (the folder itself raises)."""
    top = os.fspath(folder)
    pending = [top]
    while pending:
        current = pending.pop()
        try:
            entries = os.scandir(current)
        except PermissionError as error:
            if current == top:
                raise
            log.warning("%s cannot be read; its files are left out: %s", current, error)
            continue
        with entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif entry.is_file():
                    yield entry


def list_files(prefix: str) -> list[str]:
    """Every file below a directory/prefix, as full URIs/paths, sorted."""
    return [item.uri for item in list_stored(prefix)]


def list_stored(prefix: str) -> list[StoredFile]:
    """Every file below a directory/prefix with its size and version, sorted by URI.

    The version identifies content for caches: a file re-written under the
    same name gets a new one.
    """
    if not is_s3(prefix):
        root = local_path(prefix)
        if root.is_file():
            found = {str(prefix): root}
        else:
            scheme = "file://" if str(prefix).startswith("file://") else ""
            found = {f"{scheme}{path}": path for path in sorted(root.rglob("*")) if path.is_file()}
        return [StoredFile(uri, (stat := path.stat()).st_size, str(stat.st_mtime_ns)) for uri, path in found.items()]
    bucket, key = split_s3(prefix)
    paginator = s3_client().get_paginator("list_objects_v2")
    stored: list[StoredFile] = []
    try:
        for page in paginator.paginate(Bucket=bucket, Prefix=key):
            stored.extend(StoredFile(f"s3://{bucket}/{obj['Key']}", int(obj.get("Size", 0)), obj.get("ETag", ""))
                          for obj in page.get("Contents", []))
    except Exception as error:
        raise _s3_error(prefix, error) from error
    return sorted(stored, key=lambda item: item.uri)


def escape_reason(relative: str) -> str:
    """Why a relative path taken from outside data could land outside the folder it is joined to; "" if it cannot.

    Keys from a store listing and folder names from a dataset's classes.json
    are data, not paths we chose: a `..` segment, a leading `/` or an empty
    segment must never become part of a local path. Some stores refuse such
    keys, AWS S3 does not, so the check is ours.
    """
    if not relative:
        return "is empty"
    if "\x00" in relative:
        return "contains a NUL character"
    if relative.startswith("/"):
        return "starts with '/'"
    parts = relative.split("/")
    if "" in parts:
        return "has an empty path segment ('//' or a trailing '/')"
    if any(part in (".", "..") for part in parts):
        return "has a '.' or '..' segment"
    return ""


def delete(uri: str) -> None:
    """Delete a file/object or everything below a directory/prefix."""
    if not is_s3(uri):
        path = local_path(uri)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        return
    client = s3_client()
    for item in list_files(uri):
        bucket, key = split_s3(item)
        _s3_call(item, client.delete_object, Bucket=bucket, Key=key)


def upload(local: str | Path, uri: str) -> None:
    """Copy a local file, or a directory recursively, to a URI."""
    local = Path(local)
    if not local.exists():
        raise StorageError(f"{local}: nothing to upload")
    if not is_s3(uri):
        target = local_path(uri)
        if local.resolve() == target.resolve():
            return
        if local.is_dir():
            shutil.copytree(local, target, dirs_exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(local, target)
        return
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    client = s3_client()
    for file in files:
        target = uri if local.is_file() else join(uri, file.relative_to(local).as_posix())
        bucket, key = split_s3(target)
        _s3_call(target, client.upload_file, str(file), bucket, key)


def download(uri: str, local: str | Path) -> Path:
    """Copy a file, or everything below a prefix, from a URI to a local path; returns it."""
    local = Path(local)
    if not is_s3(uri):
        source = local_path(uri)
        if not source.exists():
            raise StorageError(f"{uri}: nothing to download")
        if source.resolve() != local.resolve():
            if source.is_dir():
                shutil.copytree(source, local, dirs_exist_ok=True)
            else:
                local.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, local)
        return local
    client = s3_client()
    bucket, key = split_s3(uri)
    if key and not key.endswith("/") and exists_object(uri):
        local.parent.mkdir(parents=True, exist_ok=True)
        _s3_call(uri, client.download_file, bucket, key, str(local))
        return local
    prefix = uri.rstrip("/") + "/"
    # keys ending in "/" are the folder markers some tools create: they hold no file
    items = [item.uri for item in list_stored(prefix) if not item.uri.endswith("/")]
    if not items:
        raise StorageError(f"{uri}: nothing to download (no object or prefix)")
    targets = [local / _relative_key(prefix, item, local) for item in items]
    for item, target in zip(items, targets, strict=False):
        target.parent.mkdir(parents=True, exist_ok=True)
        item_bucket, item_key = split_s3(item)
        _s3_call(item, client.download_file, item_bucket, item_key, str(target))
    return local


def _relative_key(prefix: str, item: str, local: Path) -> PurePosixPath:
    """The path below `local` of a listed key, refused (before anything is written) when it could leave `local`."""
    relative = item[len(prefix):]
    reason = escape_reason(relative)
    if reason:
        raise StorageError(f"{item}: the key below {prefix} {reason}, so it would be written outside {local}; "
                           "nothing was downloaded: rename or delete that object")
    return PurePosixPath(relative)


def exists_object(uri: str) -> bool:
    """True when exactly this S3 key (not a prefix) exists."""
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise _s3_error(uri, error) from error
    except Exception as error:
        raise _s3_error(uri, error) from error


def ensure_bucket(uri: str) -> bool:
    """Create the bucket of an s3:// URI if it is missing (no-op for local paths); True when it created it."""
    if not is_s3(uri):
        return False
    from botocore.exceptions import ClientError

    bucket, _ = split_s3(uri)
    client = s3_client()
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise _s3_error(uri, error) from error
        _s3_call(uri, client.create_bucket, Bucket=bucket)
        return True
    except Exception as error:
        raise _s3_error(uri, error) from error
    return False


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a local file, read in 1 MiB blocks (archives and models can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def s3_env(access_key: str | None, secret_key: str | None, extra: dict[str, Any]) -> dict[str, str]:
    """AWS environment variables from an Airflow `aws` connection's login, password and extra.

    Accepts both `extra.endpoint_url` and the per-service
    `extra.service_config.s3.endpoint_url` forms of the amazon provider.
    """
    endpoint = extra.get("service_config", {}).get("s3", {}).get("endpoint_url") or extra.get("endpoint_url")
    values = {
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": extra.get("region_name"),
    }
    return {key: str(value) for key, value in values.items() if value}


def use_credentials(connection: Any) -> None:
    """Point this process's S3 calls at the store an Airflow `aws` connection describes (its login, password and
    extra, see s3_env): the one place the DAG's tasks and the UI plugin export credentials."""
    os.environ.update(s3_env(connection.login, connection.password, connection.extra_dejson))
