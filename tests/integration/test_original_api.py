"""The original PyFed README's example scripts, run unchanged (bar the data source) as separate processes."""

import re
import shutil
import sys
from pathlib import Path

import pytest

from tests.integration.support import run_dir

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "original_api"


# The scripts listen on the original API's fixed port, 54321, as a user's copy of them would: the two
# variants keep to one xdist worker, one after the other, or the second finds the port taken.
@pytest.mark.xdist_group("original-api-port-54321")
@pytest.mark.parametrize("variant", ["single_system", "multi_system"])
def test_original_example_scripts_run_unattended(tmp_path, processes, variant):
    source = EXAMPLES if variant == "single_system" else EXAMPLES / "multi_system"
    for script in ["server.py", "client_1.py", "client_2.py", "client_3.py"]:
        shutil.copy(source / script, tmp_path / script)
    shutil.copy(EXAMPLES / "data.py", tmp_path / "data.py")
    data = processes.start("data", [sys.executable, "data.py"], cwd=tmp_path)
    assert processes.wait(data, 120) == 0, processes.tail(data)

    server = processes.start("server", [sys.executable, "server.py"], cwd=tmp_path)
    processes.wait_for_line(server, "listening on")
    clients = [processes.start(f"client_{i}", [sys.executable, f"client_{i}.py"], cwd=tmp_path) for i in (1, 2, 3)]

    assert processes.wait(server, 600) == 0, processes.tail(server)
    for client in clients:
        assert processes.wait(client, 60) == 0, processes.tail(client)

    output = server.log_path.read_text()
    assert "round 2/2 finished" in output and "3/3 updates" in output
    match = re.search(r"Test results: .*accuracy ([0-9.]+)", output)
    assert match, processes.tail(server)
    assert float(match.group(1)) >= 0.8  # 2 rounds of the seed's 5.4M-parameter MLP on upscaled digits
    # train() returned on its own (no TensorBoard server blocking it) and the log tree is there
    for run in ["server", "clients/client_1", "clients/client_2", "clients/client_3"]:
        assert list((run_dir(tmp_path / "logs") / run).glob("events.out.tfevents.*")), run
