import pytest

from tests.docker.support import require_docker


@pytest.fixture(scope="session")
def docker_ready():
    require_docker()
