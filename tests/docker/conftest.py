import pytest

from tests.docker.support import build_images, require_docker


@pytest.fixture(scope="session")
def docker_ready():
    """A running engine, and the images built once (each test's ``--build`` then finds them cached)."""
    require_docker()
    build_images()
