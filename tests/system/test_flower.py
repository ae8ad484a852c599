"""Flower (``celery -A celery_app flower``) against the test broker with a worker running:
its HTTP API lists every task name of docs/deployment.md on the worker."""
from __future__ import annotations

import socket

import pytest
import requests

from tests.system.test_celery_worker import (Process, broker_env, broker_url, celery_env, start_worker,  # noqa: F401
                                      wait_until)
from tests.integration.celery.test_tasks import STABLE_TASK_NAMES


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def registered_on(base: str, worker_name: str) -> set[str]:
    """The task names Flower reports for the worker, asking it to inspect afresh."""
    try:
        response = requests.get(f"{base}/api/workers", params={"refresh": "1"}, timeout=15)
    except requests.ConnectionError:
        return set()  # Flower still starting
    if response.status_code != 200:
        return set()
    return set(response.json().get(worker_name, {}).get("registered", []))


@pytest.mark.slow
def test_flower_lists_every_spec_task_on_a_running_worker(broker_url, broker_env, pg_database, smtp_server_session,
                                                         tmp_path):
    env = celery_env(broker_url, pg_database, smtp_server_session.host, smtp_server_session.port, **broker_env,
                     FLOWER_UNAUTHENTICATED_API="true")  # the API answers only with auth or this
    worker = start_worker(env, tmp_path, pool="threads", concurrency=1)
    port = free_port()
    flower = Process(["flower", f"--port={port}", "--address=127.0.0.1", f"--broker={broker_url}"], env,
                     tmp_path / "flower.log")
    try:
        base = f"http://127.0.0.1:{port}"
        found: set[str] = set()

        def has_all() -> bool:
            found.update(registered_on(base, worker.name))
            return STABLE_TASK_NAMES <= found or flower.popen.poll() is not None

        wait_until(has_all, 60, lambda: flower.output()[-3000:])
    finally:
        flower.stop()
        worker.stop()
    assert STABLE_TASK_NAMES <= found, flower.output()[-3000:]
