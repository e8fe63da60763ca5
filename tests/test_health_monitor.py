"""The background health monitor: probes on its interval, notices a server going away and
coming back, stops on close, and is a daemon."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from dbkit import Database


def wait_for(condition: Callable[[], bool], limit: float = 15.0) -> bool:
    """Poll a condition the background thread makes true (bounded; not a timing assert)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_monitor_probes_and_follows_the_server(make_server: Any) -> None:
    server = make_server()
    # The breaker opens while the server is down (probes come every 50 ms); a short
    # recovery lets the first probe after the restart through instead of 30 s later.
    db = Database.from_url(
        server.url, health_check_interval=0.05, timeout=1, breaker_recovery_timeout=0.2
    ).connect()
    try:
        monitor = db._monitor
        assert monitor is not None and monitor.daemon
        assert wait_for(lambda: monitor.probes >= 2)
        assert db.last_health is not None and db.last_health.ok
        server.kill()
        assert wait_for(lambda: db.last_health is not None and not db.last_health.ok)
        server.start()
        assert wait_for(lambda: db.last_health is not None and db.last_health.ok)
    finally:
        db.close()
    monitor.join(timeout=5)
    assert not monitor.is_alive()
    probes = monitor.probes
    time.sleep(0.2)
    assert monitor.probes == probes  # stopped for good


def test_monitor_is_off_when_interval_is_zero(db_url: str) -> None:
    with Database.from_url(db_url, health_check_interval=0) as db:
        assert db._monitor is None and db.last_health is None
