"""Name each Celery worker in task instances when several run on one machine.

Airflow records `[core] hostname_callable()` as a task instance's hostname; on
loopback both workers share the machine's name, so the distributed-mode test
points the option at `worker_name` and gives each worker its own TLP_WORKER_NAME.
"""
from __future__ import annotations

import socket

from tasks import settings


def worker_name() -> str:
    """This worker's name from TLP_WORKER_NAME (set per worker by the test), else the machine's."""
    return settings.load().worker_name or socket.getfqdn()
