"""The CLI's entry point: what it says before a command's own work starts."""

from __future__ import annotations

import logging

import pytest

from pyfed import cli

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("command", sorted(cli.LOADS_TENSORFLOW))
def test_a_command_that_loads_tensorflow_says_it_is_starting_before_it_does(command, monkeypatch, caplog):
    """The server was silent for 14-35 s while it imported TensorFlow: a user could not tell it from a hang."""
    seen_before_handler: list[str] = []
    config_cls, _, description = cli.COMMANDS[command]

    def handler(config):
        seen_before_handler.extend(record.getMessage() for record in caplog.records)
        return 0

    monkeypatch.setitem(cli.COMMANDS, command, (config_cls, handler, description))
    monkeypatch.setattr(cli, "_setup_logging", lambda level: None)
    monkeypatch.setattr(cli, "_dotenv", lambda: {})
    for name in ("SERVER_ADDRESS", "DATA_SHARD", "TEST_DATA"):
        monkeypatch.delenv(name, raising=False)
    with caplog.at_level(logging.INFO, logger="pyfed"):
        assert cli.main([command]) == 0
    assert any(line.startswith("pyfed ") and f" {command} starting (loading TensorFlow)" in line
               for line in seen_before_handler), seen_before_handler


def test_a_command_that_needs_no_tensorflow_starts_without_that_line(monkeypatch, caplog):
    config_cls, _, description = cli.COMMANDS["keys"]
    monkeypatch.setitem(cli.COMMANDS, "keys", (config_cls, lambda config: 0, description))
    monkeypatch.setattr(cli, "_setup_logging", lambda level: None)
    monkeypatch.setattr(cli, "_dotenv", lambda: {})
    with caplog.at_level(logging.INFO, logger="pyfed"):
        assert cli.main(["keys"]) == 0
    assert not any("loading TensorFlow" in record.getMessage() for record in caplog.records)
