"""The multi-host test bed as fixtures: three machines with their own Docker engines, and the PyFed
images in machine a's registry.

These tests need root, a Docker engine on this host (it builds the images, as a developer's machine
or a CI runner would), and the tools the test bed lists. They fail (never skip) without them.
"""

from __future__ import annotations

import time

import pytest

from tests.docker.support import REPO, build_images, docker, require_docker
from tests.multihost.testbed import TestBed


@pytest.fixture(scope="session")
def testbed():
    """Machines a, b and c, started clean and always torn down."""
    bed = TestBed()
    started = time.monotonic()
    try:
        bed.start()
        print(f"\ntest bed: 3 machines with their own engines and a registry on a, in {time.monotonic() - started:.0f} s")
        yield bed
    finally:
        bed.stop()
        left = bed.leftovers()
        assert not left, f"the test bed left {left}"


@pytest.fixture(autouse=True)
def clean_machines(testbed):
    """Each scenario starts on clean machines and leaves them clean, whatever the one before it did:
    a scenario that fails half-way leaves its containers running (a server on machine a's port 5555, a
    TensorBoard on 6006), and the next scenario's `compose up` would fail on them or read their logs."""
    for machine in testbed.machines.values():
        left = machine.clear()
        if left:
            print(f"\ntest bed: cleared what an earlier scenario left on {machine.name}: {', '.join(left)}")
    yield
    for machine in testbed.machines.values():
        machine.clear()


@pytest.fixture(scope="session")
def images(testbed) -> str:
    """The server and client images built on this host and pushed to machine a's registry, as the
    README's step 2 does (`docker compose build server client && docker compose push server client`
    with IMAGE_PREFIX naming the registry). Returns IMAGE_PREFIX. The machines pull from there.

    The build runs on this host's engine, not on machine a's: the Dockerfiles install TensorFlow
    with pip, and the test bed's machines reach nothing outside their subnet."""
    require_docker()
    env = {"IMAGE_PREFIX": testbed.image_prefix}
    started = time.monotonic()
    build_images(env)  # after (or before) the Docker tests' build, whose layers it reuses
    docker("compose", "push", "server", "client", env=env, timeout=1800, cwd=REPO)
    print(f"\nimages built and pushed to {testbed.registry_address} in {time.monotonic() - started:.0f} s")
    return testbed.image_prefix
