""".env.example, compose.yaml and the config classes agree: every documented variable does something."""

import dataclasses
import re
from pathlib import Path

from pyfed.config import ClientConfig, PartitionConfig, ServerConfig

REPO = Path(__file__).resolve().parents[2]
COMPOSE_ONLY = {"BASE_IMAGE", "TENSORFLOW", "PYFED_TAG", "SERVER_PORT", "TENSORBOARD_PORT"}
#: set inside compose.yaml to paths in the containers, not by users
COMPOSE_SET = {"BIND_ADDRESS", "TEST_DATA", "LOGDIR", "CHECKPOINT_DIR", "CURVE_SECRET_KEY", "AUTHORIZED_KEYS"}


def env_example_keys() -> list[str]:
    return [m.group(1) for m in re.finditer(r"^([A-Z][A-Z0-9_]*)=", (REPO / ".env.example").read_text(), re.M)]


def test_every_env_example_variable_is_read_by_a_config_and_passed_by_compose():
    known = {f.metadata["env"] for cls in (ServerConfig, ClientConfig, PartitionConfig) for f in dataclasses.fields(cls)}
    compose = (REPO / "compose.yaml").read_text()
    for key in env_example_keys():
        assert key in known | COMPOSE_ONLY, f"{key} in .env.example is read by nothing"
        assert "${" + key in compose, f"{key} in .env.example is not passed by compose.yaml"


def test_every_server_strategy_setting_is_documented_in_env_example():
    keys = set(env_example_keys())
    strategy_vars = {f.metadata["env"] for f in dataclasses.fields(ServerConfig)} - COMPOSE_SET
    assert strategy_vars <= keys, strategy_vars - keys
