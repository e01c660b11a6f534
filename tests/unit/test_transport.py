"""Transport settings that are process-wide."""

import os
import subprocess
import sys
import pytest

pytestmark = pytest.mark.unit


def _applied(env: dict) -> str:
    return subprocess.run([sys.executable, "-c", "from pyfed.wire.transport import keep_receive_buffers as k; print(k())"],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=60).stdout.strip()


def test_malloc_tuning_is_applied_on_glibc_and_can_be_turned_off():
    assert _applied({}) == "True"  # this project's machines run glibc (Debian)
    assert _applied({"PYFED_MALLOC_TUNING": "0"}) == "False"
