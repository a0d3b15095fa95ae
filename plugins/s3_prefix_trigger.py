"""An event trigger for AssetWatcher: fires when the objects under an S3 prefix (or a folder) change.

Airflow has no S3 watcher (apache/airflow#50791 was closed unmerged); this one
polls the listing's fingerprint (tasks.data_watch) every `interval_s` seconds
in the triggerer, so no worker slot is held while it waits. The first poll
sets the baseline (or it is read back from the asset's state store, so a
triggerer restart does not forget what it last saw); every later change yields
one TriggerEvent, which Airflow turns into an asset event that schedules the
retrain DAG. It lives in plugins/ because it imports Airflow (tasks/ must not)
and the triggerer can import from the plugins folder.
"""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

STATE_KEY = "listing_fingerprint"


class S3PrefixChangedTrigger(BaseEventTrigger):
    """Yields an event each time the listing of `prefix` differs from the one seen before."""

    def __init__(self, prefix: str, interval_s: float = 60.0, conn_id: str | None = None):
        super().__init__()
        self.prefix = prefix
        self.interval_s = interval_s
        self.conn_id = conn_id

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{__name__}.S3PrefixChangedTrigger",
                {"prefix": self.prefix, "interval_s": self.interval_s, "conn_id": self.conn_id})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from tasks.data_watch import listing_fingerprint

        env = await self._store_env()
        seen = await self._remembered()
        if seen is None:
            seen = await asyncio.to_thread(listing_fingerprint, self.prefix, env)
            await self._remember(seen)
        self.log.info("watching %s every %.0f s (listing %s)", self.prefix, self.interval_s, seen[:12])
        while True:
            await asyncio.sleep(self.interval_s)
            now = await asyncio.to_thread(listing_fingerprint, self.prefix, env)
            if now != seen:
                self.log.info("%s changed (listing %s -> %s)", self.prefix, seen[:12], now[:12])
                await self._remember(now)
                yield TriggerEvent({"prefix": self.prefix, "fingerprint": now, "previous": seen})
                seen = now

    async def _store_env(self) -> dict[str, str] | None:
        """The store's AWS_* settings from the Airflow connection (None: the triggerer's own environment)."""
        if not self.conn_id:
            return None
        from airflow.sdk import Connection
        from airflow.sdk.exceptions import AirflowNotFoundException

        from tasks.storage import s3_env

        try:
            conn = await Connection.async_get(self.conn_id)
        except AirflowNotFoundException:
            return None
        return s3_env(conn.login, conn.password, conn.extra_dejson)

    async def _remembered(self) -> str | None:
        if self.asset_state_store is None:
            return None
        return await self.asset_state_store.aget(STATE_KEY)

    async def _remember(self, fingerprint: str) -> None:
        if self.asset_state_store is not None:
            await self.asset_state_store.aset(STATE_KEY, fingerprint)
