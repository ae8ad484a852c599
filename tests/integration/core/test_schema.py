import pytest
import sqlalchemy as sa

from alerts.core import tables as m
from alerts.core.db import NotMigrated, check_migrated, make_engine, migrate
from tests.support.factories import add_event, add_pref, add_user


def test_migrate_twice_is_a_no_op(db_url):
    assert migrate(db_url) == migrate(db_url)
    check_migrated(make_engine(db_url))


def test_an_unmigrated_database_is_reported(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(NotMigrated, match="alerts migrate"):
        check_migrated(engine)


@pytest.mark.parametrize("table,values", [
    ("user_alert_prefs", {"channel": "pigeon"}),
    ("user_alert_prefs", {"min_severity": 6}),
    ("user_alert_prefs", {"delivery_kind": "weekly"}),
])
def test_check_constraints_reject_bad_pref_values(engine, table, values):
    with pytest.raises(sa.exc.IntegrityError):
        with engine.begin() as conn:
            add_pref(conn, add_user(conn), **values)


def test_event_with_bad_producer_fields_is_stored_for_phase_a_to_reject(engine):
    with engine.begin() as conn:
        add_event(conn, severity=99, title="", alert_type="Bad Type!", url="javascript:alert(1)")
        assert conn.execute(sa.select(sa.func.count()).select_from(m.alert_events)).scalar() == 1


def test_repeated_event_key_is_rejected_by_the_unique_constraint(engine):
    with pytest.raises(sa.exc.IntegrityError):
        with engine.begin() as conn:
            add_event(conn, event_key="same")
            add_event(conn, event_key="same")


def test_the_migrations_build_exactly_the_schema_the_code_declares(db_url):
    """alembic's autogenerate comparison finds nothing to add, drop or change."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), m.metadata)
    finally:
        engine.dispose()
    assert diffs == []
