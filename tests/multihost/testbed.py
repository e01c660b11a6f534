"""Three machines on one host: network namespaces on a private bridge, each with its own Docker engine.

Machine ``a``, ``b`` and ``c`` each get:
- a network namespace (``pyfed-tb-<name>``) with one interface on the bridge ``pyfedtb0`` and an
  address on SUBNET (10.251.7.1, .2, .3; the host side of the bridge is .254), default route via
  the bridge, so nothing leaves the subnet except through the host's own routes (none are added);
- a mount and UTS namespace: its hostname is ``machine-<name>`` (Swarm names nodes, and PyFed's
  Swarm clients, after it) and ``/srv/pyfed`` is its own directory, as each machine's disk would be;
- a Docker engine with its own data root, exec root, pid file, socket, cgroup parent and config.

Machine ``a`` also runs an image registry (Debian's ``docker-registry``) on 10.251.7.1:5000 with a
TLS certificate made here; every engine on this host trusts it through
``/etc/docker/certs.d/10.251.7.1:5000/ca.crt`` (Docker's per-registry CA), so no engine is told to
accept an insecure registry.

Everything is under STATE_DIR and RUN_DIR and the names above; :meth:`TestBed.clean` removes a
previous run's leftovers (killing, by pid, only processes inside these namespaces or cgroups) so a
second run starts clean, and :meth:`TestBed.stop` is called even when a test fails.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.docker.support import why_docker_failed

SUBNET = ipaddress.ip_network("10.251.7.0/24")
HOST_ADDRESS = "10.251.7.254"
BRIDGE = "pyfedtb0"
PREFIX = "pyfed-tb"
STATE_DIR = Path("/var/lib/pyfed-testbed")
RUN_DIR = Path("/run/pyfed-testbed")
NODE_DIR = Path("/srv/pyfed")  # each machine's own, through its mount namespace
REGISTRY_PORT = 5000
CERTS_D = Path("/etc/docker/certs.d")
CGROUP_ROOT = Path("/sys/fs/cgroup")
FORWARD_RULE = ("-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT")


class TestBedError(AssertionError):
    """The test bed could not be set up: a failure (never a skip), with what went wrong."""


def run(*args: str, check: bool = True, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise TestBedError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result


def stop_process(process: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM a process this test bed started, and SIGKILL it if it is not gone within ``timeout_s``."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


class Machine:
    """One machine of the test bed: its namespace, address, disk and Docker engine."""

    def __init__(self, name: str, index: int):
        self.name = name
        self.hostname = f"machine-{name}"
        self.netns = f"{PREFIX}-{name}"
        self.address = str(SUBNET.network_address + index)
        self.host_veth = f"{PREFIX}-{name}"[:15]  # the bridge side; the namespace side is eth0
        self.state = STATE_DIR / name
        self.run_dir = RUN_DIR / name
        self.socket = self.run_dir / "docker.sock"
        self.disk = self.state / "srv"  # this machine's /srv/pyfed
        self.cgroup_parent = f"{PREFIX}-{name}"
        self.engine: subprocess.Popen | None = None

    # --- the network ---------------------------------------------------------------------------

    def create_network(self) -> None:
        run("ip", "netns", "add", self.netns)
        run("ip", "link", "add", self.host_veth, "type", "veth", "peer", "name", "eth0", "netns", self.netns)
        run("ip", "link", "set", self.host_veth, "master", BRIDGE, "up")
        for command in (("link", "set", "lo", "up"),
                        ("addr", "add", f"{self.address}/{SUBNET.prefixlen}", "dev", "eth0"),
                        ("link", "set", "eth0", "up"),
                        ("route", "add", "default", "via", HOST_ADDRESS)):
            run("ip", "-n", self.netns, *command)

    def set_link(self, up: bool) -> None:
        """Plug or unplug this machine's cable (its interface on the bridge)."""
        run("ip", "-n", self.netns, "link", "set", "eth0", "up" if up else "down")
        if up:
            run("ip", "-n", self.netns, "route", "replace", "default", "via", HOST_ADDRESS)

    def limit_bandwidth(self, rate: str) -> None:
        """Both directions of this machine's link to ``rate`` (``tc`` token bucket, e.g. ``20mbit``)."""
        self._root_qdisc("replace", "tbf", "rate", rate, "burst", "64kb", "latency", "200ms")

    def clear_bandwidth_limit(self) -> None:
        self._root_qdisc("del", check=False)

    def _root_qdisc(self, action: str, *spec: str, check: bool = True) -> None:
        """``tc qdisc ACTION`` at the root of both ends of the cable: this machine's eth0 (what it
        sends) and the bridge's port to it (what it receives)."""
        for namespace, device in ((self.netns, "eth0"), (None, self.host_veth)):
            prefix = ("ip", "netns", "exec", namespace) if namespace else ()
            run(*prefix, "tc", "qdisc", action, "dev", device, "root", *spec, check=check)

    # --- the engine -----------------------------------------------------------------------------

    def start_engine(self, timeout_s: float = 90) -> None:
        """Start this machine's dockerd in its namespaces; wait until it answers."""
        for directory in (self.state / "docker", self.disk, self.run_dir):
            directory.mkdir(parents=True, exist_ok=True)
        config = self.state / "daemon.json"
        config.write_text(json.dumps({"cgroup-parent": self.cgroup_parent, "log-driver": "json-file"}))
        script = (f"hostname {self.hostname} && mount --make-rprivate / && mount --bind {self.disk} {NODE_DIR} && "
                  f"exec dockerd --config-file {config} --data-root {self.state / 'docker'} "
                  f"--exec-root {self.run_dir / 'exec'} --pidfile {self.run_dir / 'dockerd.pid'} "
                  f"--host unix://{self.socket}")
        log = open(self.state / "dockerd.log", "ab")
        self.engine = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.netns}", "--", "unshare", "--mount", "--uts", "--", "sh", "-c", script],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.engine.poll() is not None:
                raise TestBedError(f"{self.name}'s dockerd exited ({self.engine.returncode}):\n{self.engine_log()}")
            if self.docker("info", "--format", "{{.ID}}", check=False, timeout=10).returncode == 0:
                return
            time.sleep(0.5)
        raise TestBedError(f"{self.name}'s dockerd did not answer within {timeout_s} s:\n{self.engine_log()}")

    def engine_log(self, tail: int = 3000) -> str:
        path = self.state / "dockerd.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": f"unix://{self.socket}"}

    def docker(self, *args: str, check: bool = True, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
        return run("docker", *args, check=check, timeout=timeout, env={**self.env(), **kwargs.pop("env", {})},
                   **kwargs)

    def sh(self, command: str, env: dict[str, str] | None = None, timeout: float = 900, cwd: Path | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
        """A shell command typed on this machine: ``docker`` talks to its engine."""
        result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                                env={**self.env(), **(env or {})})
        if check and result.returncode != 0:
            raise AssertionError(f"on {self.name}: {command} failed ({result.returncode}): {why_docker_failed(result)}\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def clear(self) -> list[str]:
        """Put the machine back as a scenario expects to find it: its link up and unlimited, out of any
        swarm, no container, no volume, no network of its own; the pulled images stay (they are what a
        machine keeps between runs). Returns what was left to clear, for the test's report. An engine
        that is down (a scenario powered the machine off) is started again first."""
        self.set_link(True)
        self.clear_bandwidth_limit()
        if self.engine is None or self.engine.poll() is not None:
            self.start_engine()
        left = []
        if self.docker("info", "--format", "{{.Swarm.LocalNodeState}}", timeout=60).stdout.strip() != "inactive":
            left.append("a swarm")
            self.docker("swarm", "leave", "--force", check=False, timeout=120)
        containers = self.docker("ps", "-aq", timeout=60).stdout.split()
        if containers:
            left.append(f"{len(containers)} container(s)")
            # a swarm just left removes its tasks' containers itself: "removal ... already in progress"
            self.docker("rm", "-f", "-v", *containers, timeout=300, check=False)
            deadline = time.monotonic() + 120
            while self.docker("ps", "-aq", timeout=60).stdout.split():
                if time.monotonic() > deadline:
                    raise TestBedError(f"machine {self.name}: containers still there 120 s after docker rm -f")
                time.sleep(1)
        volumes = self.docker("volume", "ls", "-q", timeout=60).stdout.split()
        if volumes:
            left.append(f"{len(volumes)} volume(s)")
            self.docker("volume", "rm", "-f", *volumes, timeout=120)
        self.docker("network", "prune", "-f", timeout=120)
        return left

    def pids(self) -> list[int]:
        """Every process of this machine: in its network namespace or in its engine's cgroups."""
        found = set(int(p) for p in run("ip", "netns", "pids", self.netns, check=False).stdout.split())
        for tasks in CGROUP_ROOT.glob(f"*/{self.cgroup_parent}/**/tasks"):
            try:
                found.update(int(p) for p in tasks.read_text().split())
            except OSError:
                pass
        return sorted(found - {os.getpid()})

    def power_off(self) -> None:
        """A machine failure: the cable is pulled and every process of the machine dies at once."""
        self.set_link(False)
        self._kill_all(signal.SIGKILL)
        if self.engine is not None:
            self.engine.wait(timeout=30)
            self.engine = None

    def stop_engine(self) -> None:
        """Stop the engine (SIGTERM, then SIGKILL whatever is left of the machine's processes)."""
        if self.engine is not None and self.engine.poll() is None:
            self.engine.send_signal(signal.SIGTERM)
            try:
                self.engine.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        self._kill_all(signal.SIGKILL)
        if self.engine is not None:
            self.engine.wait(timeout=30)
        self.engine = None

    def _kill_all(self, sig: int) -> None:
        for _ in range(5):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)

    def destroy(self) -> None:
        self.stop_engine()
        for cgroup in sorted(CGROUP_ROOT.glob(f"*/{self.cgroup_parent}/**/"), key=lambda p: -len(p.parts)):
            try:
                cgroup.rmdir()  # a killed engine's containers leave their (now empty) cgroups
            except OSError:
                pass
        run("ip", "netns", "del", self.netns, check=False)
        run("ip", "link", "del", self.host_veth, check=False)


class TestBed:
    """Three machines (a, b, c) on one bridge, and a TLS image registry on a."""

    def __init__(self, names: tuple[str, ...] = ("a", "b", "c")):
        self.machines = {name: Machine(name, index) for index, name in enumerate(names, start=1)}
        self.registry: subprocess.Popen | None = None

    def __getitem__(self, name: str) -> Machine:
        return self.machines[name]

    @property
    def registry_address(self) -> str:
        return f"{self.machines['a'].address}:{REGISTRY_PORT}"

    @property
    def image_prefix(self) -> str:
        return f"{self.registry_address}/"

    def check_prerequisites(self) -> None:
        if os.geteuid() != 0:
            raise TestBedError("the multi-host test bed needs root (network namespaces, Docker engines)")
        for tool in ("ip", "iptables", "nsenter", "unshare", "tc", "dockerd", "docker", "docker-registry", "openssl"):
            if shutil.which(tool) is None:
                raise TestBedError(f"the multi-host test bed needs {tool!r} on PATH (.ci/run installs it)")
        routes = run("ip", "-4", "route", "show").stdout
        for line in routes.splitlines():
            destination = line.split()[0]
            if destination != "default" and "/" in destination and BRIDGE not in line:
                if ipaddress.ip_network(destination, strict=False).overlaps(SUBNET):
                    raise TestBedError(f"this host already routes {destination}, which overlaps the test bed's {SUBNET}")

    def clean(self) -> None:
        """Remove whatever a previous run left: engines, namespaces, the bridge, the registry, state."""
        for machine in self.machines.values():
            if Path(f"/run/netns/{machine.netns}").exists():
                machine.destroy()
            else:
                run("ip", "link", "del", machine.host_veth, check=False)
        self._stop_registry()
        self._remove_network()
        shutil.rmtree(STATE_DIR, ignore_errors=True)
        shutil.rmtree(RUN_DIR, ignore_errors=True)

    def start(self) -> None:
        self.check_prerequisites()
        self.clean()
        STATE_DIR.mkdir(parents=True)
        RUN_DIR.mkdir(parents=True)
        NODE_DIR.mkdir(parents=True, exist_ok=True)  # the mount point each machine binds its own disk on
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        run("ip", "addr", "add", f"{HOST_ADDRESS}/{SUBNET.prefixlen}", "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")
        # A Docker engine on this host sets FORWARD's policy to DROP, and bridged frames pass through
        # iptables (br_netfilter): let the machines talk to each other across the bridge.
        run("iptables", "-I", "FORWARD", *FORWARD_RULE)
        for machine in self.machines.values():
            machine.create_network()
        self._start_registry()
        for machine in self.machines.values():
            machine.start_engine()

    def stop(self) -> None:
        for machine in self.machines.values():
            try:
                machine.destroy()
            except Exception as error:  # noqa: BLE001 - tear down the rest whatever one machine does
                print(f"test bed: could not tear down {machine.name}: {error}")
        self._stop_registry()
        self._remove_network()
        for images in (*(m.state / "docker" for m in self.machines.values()), STATE_DIR / "registry" / "storage"):
            shutil.rmtree(images, ignore_errors=True)  # gigabytes of images; the logs stay for a look afterwards

    def leftovers(self) -> list[str]:
        """What of the test bed is still there (empty after :meth:`stop`)."""
        found = [f"network namespace {m.netns}" for m in self.machines.values() if Path(f"/run/netns/{m.netns}").exists()]
        found += [f"process {pid} of {m.name}" for m in self.machines.values() for pid in m.pids()]
        found += [f"cgroup {path}" for m in self.machines.values() for path in CGROUP_ROOT.glob(f"*/{m.cgroup_parent}")]
        if run("ip", "link", "show", BRIDGE, check=False).returncode == 0:
            found.append(f"bridge {BRIDGE}")
        if run("iptables", "-C", "FORWARD", *FORWARD_RULE, check=False).returncode == 0:
            found.append("the FORWARD rule")
        if (CERTS_D / self.registry_address).exists():
            found.append(f"{CERTS_D / self.registry_address}")
        return found

    def _remove_network(self) -> None:
        while run("iptables", "-C", "FORWARD", *FORWARD_RULE, check=False).returncode == 0:
            run("iptables", "-D", "FORWARD", *FORWARD_RULE)
        run("ip", "link", "del", BRIDGE, check=False)
        shutil.rmtree(CERTS_D / self.registry_address, ignore_errors=True)

    # --- the registry ---------------------------------------------------------------------------

    def _start_registry(self) -> None:
        a = self.machines["a"]
        directory = STATE_DIR / "registry"
        (directory / "storage").mkdir(parents=True)
        key, cert = directory / "registry.key", directory / "registry.crt"
        run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={a.address}",
            "-addext", f"subjectAltName=IP:{a.address}", "-keyout", str(key), "-out", str(cert))
        config = directory / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log: {level: warn}\n"
            f"storage: {{filesystem: {{rootdirectory: {directory / 'storage'}}}, delete: {{enabled: true}}}}\n"
            f"http: {{addr: '{self.registry_address}', tls: {{certificate: {cert}, key: {key}}}}}\n")
        trust = CERTS_D / self.registry_address
        trust.mkdir(parents=True, exist_ok=True)
        shutil.copy(cert, trust / "ca.crt")
        log = open(directory / "registry.log", "ab")
        self.registry = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{a.netns}", "--", "docker-registry", "serve", str(config)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.registry.poll() is not None:
                raise TestBedError(f"the registry exited: {(directory / 'registry.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"https://{self.registry_address}/v2/", timeout=5,
                                            context=ssl.create_default_context(cafile=str(cert))):
                    return
            except OSError:
                time.sleep(0.5)
        raise TestBedError(f"the registry did not answer: {(directory / 'registry.log').read_text()[-2000:]}")

    def _stop_registry(self) -> None:
        if self.registry is not None:
            stop_process(self.registry, 10)
        self.registry = None
