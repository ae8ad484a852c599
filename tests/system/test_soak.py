"""The short fault-injection soak (tests/system/soak/soak.py): the whole stack — PostgreSQL, a private
Redis, two Celery workers, beat, the fake SMTP server and Telegram API — under a stream of
events while every kind of fault is injected, then drained and checked: nothing lost,
nothing sent twice, every digest's items inside its window, nothing stuck in sending.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOAK = ROOT / "tests" / "system" / "soak" / "soak.py"

from tests.system.soak.soak import FAULTS  # noqa: E402

ARGS = ["--duration", "45", "--users", "150", "--rate", "1.5", "--drain-timeout", "90", "--seed", "11", "--json"]


@pytest.mark.slow
@pytest.mark.timeout(280)
def test_the_short_soak_loses_nothing_and_sends_nothing_twice():
    result = subprocess.run([sys.executable, str(SOAK), *ARGS], cwd=ROOT, capture_output=True, text=True,
                            timeout=270)

    tail = result.stderr[-6000:]
    summary_line = next((line for line in result.stdout.splitlines() if line.startswith("soak: ")), None)
    assert summary_line is not None, tail
    summary = json.loads(result.stdout.splitlines()[-1])
    assert result.returncode == 0, summary_line + "\n" + tail
    assert re.search(r" duplicates=0 .* lost=0 violations=0 drained=yes", summary_line), summary_line
    assert summary["events"] > 40 and summary["deliveries"] > summary["events"]
    assert summary["email"] > 0 and summary["telegram"] > 0 and summary["digests"] > 0
    assert set(summary["faults"]) == set(FAULTS), summary["faults"]
    assert summary["blocks"]["email"] > 0 and summary["blocks"]["telegram"] > 0, summary["blocks"]
