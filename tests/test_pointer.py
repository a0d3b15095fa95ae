"""Conditional writes of the champion pointer, on local files and on the real SeaweedFS store."""
from __future__ import annotations

import pytest

from tasks import pointer

pytestmark = pytest.mark.fast


@pytest.fixture(params=["local", "s3"])
def pointer_uri(request, tmp_path):
    """Where a pointer lives: a local file, or an object in a fresh SeaweedFS bucket."""
    if request.param == "local":
        return str(tmp_path / "model" / "champion.json")
    return request.getfixturevalue("s3_bucket") + "/model/champion.json"


def test_create_only_if_absent_succeeds_once(pointer_uri):
    assert pointer.read(pointer_uri) == (None, None)

    first = pointer.write_if(pointer_uri, {"version": "a"}, None)
    second = pointer.write_if(pointer_uri, {"version": "b"}, None)

    assert first and not second
    assert pointer.read(pointer_uri)[0] == {"version": "a"}


def test_write_against_a_stale_tag_is_refused_and_against_the_current_one_succeeds(pointer_uri):
    pointer.write_if(pointer_uri, {"version": "a"}, None)
    _, read_by_both = pointer.read(pointer_uri)

    winner = pointer.write_if(pointer_uri, {"version": "b"}, read_by_both)
    loser = pointer.write_if(pointer_uri, {"version": "c"}, read_by_both)

    assert winner and not loser
    value, tag = pointer.read(pointer_uri)
    assert value == {"version": "b"} and tag != read_by_both


def test_seaweedfs_passes_the_conditional_write_probe(s3_bucket):
    pointer.require_conditional_writes(s3_bucket + "/model")


def test_a_pointer_in_a_bucket_nothing_was_published_to_yet_does_not_exist(s3):
    """A fresh store: the first run reads the champion before any version made the registry's bucket."""
    assert pointer.read("s3://no-such-bucket-yet/model/champion.json") == (None, None)
