"""The README's recipes are the commands the tests run."""

import re
from pathlib import Path

from tests.docker.test_swarm import RECIPE
import pytest

pytestmark = pytest.mark.unit

README = Path(__file__).resolve().parents[2] / "README.md"


def code_block_after(marker: str) -> list[str]:
    """The commands of the first ```bash block after `marker`, without trailing comments."""
    text = README.read_text()
    start = text.index(marker)
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert block, f"no ```bash block after {marker!r}"
    return [re.split(r"\s+# ", line)[0].strip() for line in block.group(1).splitlines()]


def test_the_one_machine_swarm_block_is_what_the_swarm_tests_run():
    commands = code_block_after("**Try it on one machine.**")
    docker_commands = [c for c in commands if c.startswith(("docker ", "for "))]
    assert [c for c in docker_commands if c in RECIPE] == list(RECIPE), "the README shows other steps, or another order"
    # the only step the tests do differently: they read the server's log instead of following it
    assert set(docker_commands) - set(RECIPE) == {'docker service logs -f "${STACK}_server"'}


@pytest.mark.parametrize("command", ["server", "client", "partition", "simulate", "keys", "export"])
def test_every_flag_of_a_command_is_in_its_readme_table(command):
    """The README's table for `pyfed COMMAND` names each of its flags (the docs keep up with the config)."""
    import dataclasses

    from pyfed.cli import COMMANDS

    text = README.read_text()
    start = text.index(f"### `pyfed {command}`")
    section = text[start:text.index("\n#", start + 1)]
    flags = [field.metadata["flag"] for field in dataclasses.fields(COMMANDS[command][0])]
    every_command = text[text.index("## Command line"):text.index("### `pyfed partition`")]
    missing = [flag for flag in flags if not re.search(rf"`[^`]*{flag}(?![\w-])[^`]*`", section)
               and f"Every command takes `{flag}`" not in every_command]
    assert not missing, f"the README's `pyfed {command}` section lacks {missing}"


def test_the_remote_site_recipe_is_what_the_multihost_tests_run():
    from tests.multihost.test_remote_sites import SERVER_ADMITS, SERVER_UP, SITE_MAKES_KEYS, SITE_UP

    text = README.read_text()
    for block in (SITE_MAKES_KEYS, SERVER_ADMITS):
        assert f"```bash\n{chr(10).join(block)}\n```" in text, block
    assert f"```bash\n{SITE_UP}\n```" in text and f"`{SERVER_UP}`" in text


def test_the_many_machines_swarm_block_is_what_the_multihost_tests_run():
    from tests.multihost.test_swarm_machines import DEPLOY, INIT, KEYS, LABELS, SCALE

    commands = [c for c in code_block_after("From three machines `m1`") if c and not c.startswith("#")]
    for step in (INIT, *LABELS, *KEYS, DEPLOY):
        assert step in commands, step
    assert f"`{SCALE}`" in README.read_text()


def test_every_test_the_readme_names_exists():
    """The threat model and the feature sections cite the tests that show each claim: each must exist."""
    text = README.read_text()
    tests = README.parent / "tests"
    missing = []
    for path, name in re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", text):
        source = README.parent / path
        if not source.is_file() or (name and f"def {name}(" not in source.read_text()):
            missing.append(f"{path}::{name}" if name else path)
    for name in re.findall(r"`::(\w+)`", text):  # a second test of the file just cited
        if not any(f"def {name}(" in p.read_text() for p in tests.rglob("test_*.py")):
            missing.append(name)
    assert not missing, missing
