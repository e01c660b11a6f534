""".env.example, compose.yaml and the config classes agree: every documented variable does something."""

import dataclasses
import re
from pathlib import Path

from pyfed.config import ClientConfig, ExportConfig, KeysConfig, PartitionConfig, ServerConfig
import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
COMPOSE_ONLY = {"BASE_IMAGE", "TENSORFLOW", "PYFED_TAG", "IMAGE_PREFIX", "SERVER_PORT", "TENSORBOARD_PORT",
                "CLIENT_REPLICAS", "NODE_DATA_DIR", "NODE_KEYS_DIR", "INPUT_DIR", "MODEL_FILE", "SERVER_MEMORY_LIMIT",
                "EXPORT_DIR", "EXPORT_NAME", "PULL_POLICY"}
#: set inside compose.yaml to paths in the containers, not by users
COMPOSE_SET = {"BIND_ADDRESS", "TEST_DATA", "LOGDIR", "CHECKPOINT_DIR", "CURVE_SECRET_KEY", "AUTHORIZED_KEYS"}


def env_example_keys() -> list[str]:
    return [m.group(1) for m in re.finditer(r"^([A-Z][A-Z0-9_]*)=", (REPO / ".env.example").read_text(), re.M)]


def test_every_env_example_variable_is_read_by_a_config_and_passed_by_compose_or_swarm():
    known = {f.metadata["env"] for cls in (ServerConfig, ClientConfig, PartitionConfig, KeysConfig, ExportConfig)
             for f in dataclasses.fields(cls)}
    deploy_files = (REPO / "compose.yaml").read_text() + (REPO / "swarm.yaml").read_text()
    for key in env_example_keys():
        assert key in known | COMPOSE_ONLY, f"{key} in .env.example is read by nothing"
        assert "${" + key in deploy_files, f"{key} in .env.example is passed by neither compose.yaml nor swarm.yaml"


def test_every_variable_a_deploy_file_reads_is_documented_in_env_example():
    documented = set(env_example_keys())
    for name in ("compose.yaml", "compose.client.yaml", "swarm.yaml"):
        used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", (REPO / name).read_text()))
        assert used - {"LOCAL_DATA_DIR", "LOCAL_KEYS_DIR"} <= documented, (name, used - documented)


def test_every_server_strategy_setting_is_documented_in_env_example():
    keys = set(env_example_keys())
    strategy_vars = {f.metadata["env"] for f in dataclasses.fields(ServerConfig)} - COMPOSE_SET
    assert strategy_vars <= keys, strategy_vars - keys


#: variables compose.yaml reads that swarm.yaml does not, and why
NOT_IN_SWARM = {
    "BASE_IMAGE": "images are built with Compose; a stack only runs them",
    "TENSORFLOW": "the same",
    "PULL_POLICY": "the same (a stack runs the images it is given)",
    "DATASET": "no data step: each node brings its own data",
    "INPUT_DIR": "the same",
    "NUM_CLIENTS": "the same (the server hands out no shards)",
    "PARTITION_SCHEME": "the same", "PARTITION_ALPHA": "the same", "CLASSES_PER_CLIENT": "the same",
    "TEST_FRACTION": "the same",
    "CLIENT_ID": "each replica is named after its node",
    "SERVER_ADDRESS": "replicas reach the server by its service name",
    "INSECURE": "a stack always uses its Swarm secrets",
    **dict.fromkeys(("EXPORT_DIR", "EXPORT_NAME", "EXPORT_FORMAT", "EXPORT_WHICH"),
                    "Compose's export service; on a Swarm, pyfed export runs on the server's node"),
}


def test_swarm_yaml_passes_every_setting_compose_yaml_does_except_the_listed_ones():
    def variables(name: str) -> set[str]:
        return set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", (REPO / name).read_text()))

    assert variables("compose.yaml") - variables("swarm.yaml") == set(NOT_IN_SWARM)
