"""The retrain watcher: the listing fingerprint notices new, changed and deleted objects, and the AssetWatcher's
trigger (plugins/s3_prefix_trigger.py) fires on a change under an S3 prefix, and only then."""
from __future__ import annotations

import asyncio

import airflow  # noqa: F401 (as in the triggerer, Airflow makes the plugins folder importable)
import pytest

from tasks import storage
from tasks.data_watch import listing_fingerprint
from tests.helpers.triggers import next_event


@pytest.mark.fast
def test_listing_fingerprint_follows_adds_overwrites_and_deletes(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "1.jpg").write_bytes(b"one")
    first = listing_fingerprint(str(tmp_path))
    assert listing_fingerprint(str(tmp_path)) == first
    (tmp_path / "train" / "cat" / "2.jpg").write_bytes(b"two")
    added = listing_fingerprint(str(tmp_path))
    (tmp_path / "train" / "cat" / "2.jpg").write_bytes(b"TWO!")
    changed = listing_fingerprint(str(tmp_path))
    (tmp_path / "train" / "cat" / "1.jpg").unlink()
    assert len({first, added, changed, listing_fingerprint(str(tmp_path))}) == 4


@pytest.mark.slow
def test_trigger_fires_on_an_upload_under_the_prefix_and_not_without_one(s3_bucket):
    from airflow.triggers.base import BaseEventTrigger
    from s3_prefix_trigger import S3PrefixChangedTrigger

    prefix = f"{s3_bucket}/data/"
    storage.write_bytes(f"{prefix}train/cat/1.jpg", b"one")
    storage.write_bytes(f"{s3_bucket}/elsewhere/x.jpg", b"not watched")
    trigger = S3PrefixChangedTrigger(prefix, interval_s=0.2)
    assert isinstance(trigger, BaseEventTrigger)

    async def scenario():
        quiet = await next_event(trigger, 1.5)
        events = trigger.run()
        waiting = asyncio.ensure_future(events.__anext__())
        await asyncio.sleep(0.5)  # the baseline is taken
        storage.write_bytes(f"{s3_bucket}/elsewhere/y.jpg", b"still not watched")
        await asyncio.sleep(0.5)
        assert not waiting.done(), "a change outside the prefix fired the trigger"
        storage.write_bytes(f"{prefix}train/cat/2.jpg", b"two")
        event = await asyncio.wait_for(waiting, 5)
        await events.aclose()
        return quiet, event

    quiet, event = asyncio.run(scenario())
    assert quiet is None
    assert event.payload["prefix"] == prefix and event.payload["fingerprint"] == listing_fingerprint(prefix)
    assert event.payload["previous"] != event.payload["fingerprint"]
