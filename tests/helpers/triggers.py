"""Driving an Airflow trigger's `run()` in a test, as the triggerer would."""
from __future__ import annotations

import asyncio


async def next_event(trigger, seconds: float):
    """The trigger's first event within `seconds`, or None when it fires nothing in that time."""
    events = trigger.run()
    try:
        return await asyncio.wait_for(events.__anext__(), seconds)
    except TimeoutError:
        return None
    finally:
        await events.aclose()
