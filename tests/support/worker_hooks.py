"""Loaded into a test worker with ``--include tests.support.worker_hooks``.

With ``ALERTS_TEST_DIE_ONCE=PATH`` set, the pool process SIGKILLs itself right after its
first send task has returned — after the send and its outcome, before Celery acks the
task — and leaves PATH behind so that it happens once.
"""
import os
import signal
from pathlib import Path

from celery.signals import task_postrun

SEND_TASKS = {"alerts.send_digest", "alerts.send_delivery"}


@task_postrun.connect
def _die_once_after_a_send(sender=None, task=None, **_):
    marker = os.environ.get("ALERTS_TEST_DIE_ONCE")
    if not marker or task is None or task.name not in SEND_TASKS:
        return
    try:
        Path(marker).touch(exist_ok=False)
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
