"""Storage behaves the same for local paths and a real S3 store (SeaweedFS)."""
from __future__ import annotations

import time

import pytest

from devtools import seaweed
from tasks import storage

pytestmark = pytest.mark.fast


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/root"


def test_json_round_trip_and_listing(base):
    storage.write_json(storage.join(base, "a", "x.json"), {"b": 2, "a": 1})
    storage.write_text(storage.join(base, "a", "sub", "y.txt"), "hello")

    assert storage.read_json(storage.join(base, "a", "x.json")) == {"a": 1, "b": 2}
    assert storage.read_text(storage.join(base, "a", "sub", "y.txt")) == "hello"
    listed = storage.list_files(storage.join(base, "a"))
    prefix = storage.join(base, "a") + "/"
    assert [item[len(prefix):] for item in listed] == ["sub/y.txt", "x.json"]
    assert storage.exists(storage.join(base, "a"))
    assert not storage.exists(storage.join(base, "missing"))


def test_write_json_is_byte_stable(base):
    uri = storage.join(base, "stable.json")
    storage.write_json(uri, {"z": [1, 2], "a": {"y": 1, "x": 2}})
    first = storage.read_bytes(uri)
    storage.write_json(uri, {"a": {"x": 2, "y": 1}, "z": [1, 2]})
    assert storage.read_bytes(uri) == first


def test_directory_upload_download_round_trip(base, tmp_path):
    source = tmp_path / "src"
    (source / "nested").mkdir(parents=True)
    (source / "one.bin").write_bytes(b"\x00\x01")
    (source / "nested" / "two.txt").write_text("two")

    storage.upload(source, storage.join(base, "tree"))
    target = storage.download(storage.join(base, "tree"), tmp_path / "back")

    assert (target / "one.bin").read_bytes() == b"\x00\x01"
    assert (target / "nested" / "two.txt").read_text() == "two"
    storage.delete(storage.join(base, "tree"))
    assert not storage.exists(storage.join(base, "tree"))


def test_missing_file_error_names_the_uri(base):
    uri = storage.join(base, "nope.json")
    with pytest.raises(storage.StorageError, match="nope.json"):
        storage.read_json(uri)


def test_wrong_credentials_are_refused_with_a_clear_error(s3_bucket, monkeypatch):
    storage.write_text(s3_bucket + "/secret.txt", "data")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(storage.StorageError, match="access denied.*access key and secret"):
        storage.read_text(s3_bucket + "/secret.txt")


def test_missing_bucket_error_says_to_create_it(s3):
    with pytest.raises(storage.StorageError, match="does not exist.*create it"):
        storage.write_text("s3://no-such-bucket-here/x.txt", "data")


def test_ensure_bucket_creates_missing_bucket(s3):
    storage.ensure_bucket("s3://created-on-demand/prefix")
    storage.write_text("s3://created-on-demand/prefix/x.txt", "ok")
    assert storage.read_text("s3://created-on-demand/prefix/x.txt") == "ok"


def test_endpoint_down_fails_after_retries(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{seaweed.free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    with pytest.raises(storage.StoreUnavailableError, match="cannot reach S3 endpoint"):
        storage.read_bytes("s3://bucket/x")


def test_join_handles_uris_and_paths():
    assert storage.join("s3://b/runs/", "r1", "/data/") == "s3://b/runs/r1/data"
    assert storage.join("/tmp/x", "a", "b.json") == "/tmp/x/a/b.json"
    assert storage.join("file:///tmp/x", "a") == "file:///tmp/x/a"


@pytest.mark.parametrize("extra, endpoint", [
    ({"endpoint_url": "http://store:8333", "region_name": "eu-west-1"}, "http://store:8333"),
    ({"service_config": {"s3": {"endpoint_url": "http://minio:9000"}}}, "http://minio:9000"),
    ({}, None),
])
def test_s3_env_from_connection_fields(extra, endpoint):
    env = storage.s3_env("key", "secret", extra)
    assert env["AWS_ACCESS_KEY_ID"] == "key" and env["AWS_SECRET_ACCESS_KEY"] == "secret"
    assert env.get("AWS_ENDPOINT_URL") == endpoint


def test_seaweed_stops_within_3s_and_restarts_on_its_data_dir_with_every_object(tmp_path):
    """The demo keeps its store across runs: a quick stop must still close it cleanly."""
    model = bytes(range(256)) * 4096  # 1 MiB, a published model's worth of volume data
    first = seaweed.start(tmp_path / "weed")
    try:
        with pytest.MonkeyPatch.context() as env:
            for key, value in first.env().items():
                env.setenv(key, value)
            storage.ensure_bucket("s3://kept")
            storage.write_text("s3://kept/x.txt", "still here")
            storage.write_bytes("s3://kept/models/v1/model.bin", model)
            storage.write_json("s3://kept/champion.json", {"version": "v1"})
    finally:
        started = time.monotonic()
        first.stop()
        stop_seconds = time.monotonic() - started
    assert stop_seconds < 3, f"weed took {stop_seconds:.1f}s to stop; see {first.data_dir / 'weed.log'}"
    assert first.process.returncode == 0, "weed was killed instead of closing its stores"
    second = seaweed.start(tmp_path / "weed")
    try:
        with pytest.MonkeyPatch.context() as env:
            for key, value in second.env().items():
                env.setenv(key, value)
            assert storage.read_text("s3://kept/x.txt") == "still here"
            assert storage.read_bytes("s3://kept/models/v1/model.bin") == model
            assert storage.read_json("s3://kept/champion.json") == {"version": "v1"}
    finally:
        second.stop()


class ListingStore:
    """A boto3 client stand-in that lists the keys given: AWS S3 takes keys SeaweedFS refuses (`..`, `//`)."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        self.downloaded: list[tuple[str, str]] = []

    def get_paginator(self, name: str) -> "ListingStore":
        return self

    def paginate(self, Bucket: str, Prefix: str) -> list[dict]:
        return [{"Contents": [{"Key": key, "Size": 1, "ETag": '"etag"'} for key in self.keys
                              if key.startswith(Prefix)]}]

    def head_object(self, Bucket: str, Key: str) -> None:
        from botocore.exceptions import ClientError

        raise ClientError({"Error": {"Code": "404"}}, "HeadObject")

    def download_file(self, bucket: str, key: str, target: str) -> None:
        self.downloaded.append((key, target))


@pytest.mark.parametrize("evil", ["data/../escaped.txt", "data/sub/../../escaped.txt", "data//tmp/escaped.txt",
                                  "data/sub//escaped.txt", "data/./escaped.txt"])
def test_prefix_download_refuses_keys_that_would_leave_the_target(evil, tmp_path, monkeypatch):
    store = ListingStore(["data/ok.txt", evil])
    monkeypatch.setattr(storage, "s3_client", lambda: store)
    with pytest.raises(storage.StorageError, match="would be written outside .*nothing was downloaded"):
        storage.download("s3://bucket/data", tmp_path / "local")
    assert store.downloaded == []


def test_prefix_download_skips_folder_markers_and_keeps_files_below_the_target(tmp_path, monkeypatch):
    store = ListingStore(["data/", "data/sub/", "data/sub/one.txt", "data/two.txt"])
    monkeypatch.setattr(storage, "s3_client", lambda: store)
    storage.download("s3://bucket/data/", tmp_path / "local")
    assert store.downloaded == [("data/sub/one.txt", str(tmp_path / "local" / "sub" / "one.txt")),
                                ("data/two.txt", str(tmp_path / "local" / "two.txt"))]


def test_listing_carries_size_and_a_version_that_changes_with_content(base):
    uri = storage.join(base, "v", "x.bin")
    storage.write_bytes(uri, b"one")
    [first] = storage.list_stored(storage.join(base, "v"))
    storage.write_bytes(uri, b"other")
    [second] = storage.list_stored(storage.join(base, "v"))
    assert (first.uri, first.size, second.size) == (uri, 3, 5)
    assert first.version != second.version


@pytest.mark.parametrize("suffix", ["#", "#/run/eval/metrics.json", "?x=1"])
def test_file_uri_with_query_or_fragment_is_refused_not_cut_short(tmp_path, suffix):
    secret = tmp_path / "environ"
    secret.write_text("JWT_SECRET=hunter2")
    with pytest.raises(storage.StorageError, match="may not contain"):
        storage.read_bytes(f"file://{secret}{suffix}")
    with pytest.raises(storage.StorageError):
        storage.read_json(f"file:///proc/self/environ{suffix}")


def test_file_uri_with_a_host_is_refused(tmp_path):
    with pytest.raises(storage.StorageError, match="file:///"):
        storage.local_path("file://etc/passwd")
    assert storage.local_path(f"file://{tmp_path}/a") == tmp_path / "a"
    assert storage.local_path(f"{tmp_path}/a#b?c") == tmp_path / "a#b?c"


def test_s3_keys_keep_question_marks_and_hashes(s3_bucket, tmp_path):
    uri = f"{s3_bucket}/odd/what?is#this.txt"
    storage.write_text(uri, "kept")
    assert storage.read_text(uri) == "kept"
    assert storage.list_files(f"{s3_bucket}/odd/") == [uri]
    assert storage.split_s3(uri) == (s3_bucket[len("s3://"):], "odd/what?is#this.txt")
    downloaded = storage.download(f"{s3_bucket}/odd/", tmp_path / "down")
    assert (downloaded / "what?is#this.txt").read_text() == "kept"
