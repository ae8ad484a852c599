"""The database connections of a worker process (alerts/celery/worker.py), against real
PostgreSQL: each thread's transactions are its own, a broken or dropped connection never
reaches the next transaction, a forked child (a prefork pool process) opens sessions of
its own and leaves its parent's alone, and shutdown closes them all.
"""
from __future__ import annotations

import gc
import os
import threading

import pytest
import sqlalchemy as sa

from alerts.core.settings import Settings
from alerts.celery.worker import WorkerState
from tests.system.test_celery_worker import wait_until

PROBE = sa.table("probe", sa.column("n", sa.Integer))


@pytest.fixture
def admin(conn):
    """The test's own autocommit connection, outside the worker, with an empty probe table."""
    conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS probe (n integer)")
    conn.exec_driver_sql("TRUNCATE probe")
    yield conn
    conn.exec_driver_sql("DROP TABLE IF EXISTS probe")  # the schema test compares every table


@pytest.fixture
def state(pg_url, tmp_path):
    worker = WorkerState()
    worker.configure(Settings.from_env({"DATABASE_URL": pg_url, "ALERTS_OUTBOX_DIR": str(tmp_path)}))
    yield worker
    worker.close()


def backend_pid(db) -> int:
    with db.transaction() as conn:
        return conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()


def worker_sessions(admin) -> set[int]:
    return set(admin.execute(sa.text(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
        "AND backend_type = 'client backend'")).scalars())


def terminate(admin, pid: int) -> None:
    """End one session and wait until its server process has gone."""
    assert admin.execute(sa.text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pid}).scalar()


def probe_values(admin) -> list[int]:
    return sorted(admin.execute(sa.select(PROBE.c.n)).scalars())


def test_threads_running_transactions_at_once_each_have_a_session_of_their_own(state, admin):
    db, threads = state.db(), 4
    inside = threading.Barrier(threads, timeout=10)
    pids, errors = [], []

    def run(n: int) -> None:
        try:
            with db.transaction() as conn:
                conn.execute(sa.insert(PROBE).values(n=n))
                pids.append(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar())
                inside.wait()  # every thread is inside its transaction now
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(15)

    assert errors == []
    assert len(set(pids)) == threads
    assert probe_values(admin) == list(range(threads))


def test_a_transaction_begun_inside_another_on_the_same_thread_commits_on_its_own(state, admin):
    db = state.db()
    with pytest.raises(RuntimeError):
        with db.transaction() as outer:
            outer.execute(sa.insert(PROBE).values(n=1))
            with db.transaction() as inner:
                inner.execute(sa.insert(PROBE).values(n=2))
            raise RuntimeError("the outer transaction fails")
    assert probe_values(admin) == [2]


def test_a_failed_transaction_is_rolled_back_and_the_next_one_runs(state, admin):
    db = state.db()
    with pytest.raises(ZeroDivisionError):
        with db.transaction() as conn:
            conn.execute(sa.insert(PROBE).values(n=1))
            1 / 0
    with db.transaction() as conn:
        conn.execute(sa.insert(PROBE).values(n=2))
    assert probe_values(admin) == [2]


def test_a_session_the_server_ended_between_transactions_is_replaced_before_use(state, admin):
    db = state.db()
    first = backend_pid(db)
    terminate(admin, first)

    with db.transaction() as conn:  # no error: the dead connection is never used
        conn.execute(sa.insert(PROBE).values(n=1))
    assert backend_pid(db) != first
    assert probe_values(admin) == [1]


def test_a_session_the_server_ended_inside_a_transaction_fails_it_and_the_next_one_runs(state, admin):
    db = state.db()
    with pytest.raises(sa.exc.OperationalError):
        with db.transaction() as conn:
            conn.execute(sa.insert(PROBE).values(n=1))
            terminate(admin, conn.execute(sa.text("SELECT pg_backend_pid()")).scalar())
            conn.execute(sa.insert(PROBE).values(n=2))
    with db.transaction() as conn:
        conn.execute(sa.insert(PROBE).values(n=3))
    assert probe_values(admin) == [3]


def test_a_forked_child_opens_its_own_session_and_leaves_its_parents_alone(state):
    parent = backend_pid(state.db())
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child: what a prefork pool process does first, then a task
        status = 1
        try:
            os.close(read)
            state.after_fork()
            mine = backend_pid(state.db())
            gc.collect()  # whatever the child dropped of its parent's is collected now
            os.write(write, str(mine).encode())
            state.close()
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read) as pipe:
        child_session = int(pipe.read() or 0)
    assert os.waitpid(child, 0)[1] == 0

    assert child_session not in (0, parent)
    assert backend_pid(state.db()) == parent  # the parent's session was neither used nor closed


def test_at_shutdown_every_threads_connection_is_closed(state, admin):
    db = state.db()
    pids = []
    workers = [threading.Thread(target=lambda: pids.append(backend_pid(db))) for _ in range(3)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(15)
    assert set(pids) <= worker_sessions(admin)

    state.close()

    # a server process takes a moment to leave the list
    wait_until(lambda: not worker_sessions(admin), 10, describe=lambda: f"still open: {worker_sessions(admin)}")
    assert worker_sessions(admin) == set()
