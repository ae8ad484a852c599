"""Hypothesis settings shared by the property-based tests: few examples, so the suite
stays fast (each run draws new ones, so coverage grows run by run), no deadline (the
machine is shared and slow at times), and no example database, so one engineer's
failing examples are not replayed in another's run."""
from __future__ import annotations

from hypothesis import HealthCheck, settings


def properties(max_examples: int = 50, **kwargs) -> settings:
    return settings(max_examples=max_examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture],
                    **kwargs)
