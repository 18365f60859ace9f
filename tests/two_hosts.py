"""SLURM compute hosts on one Linux machine, for tests/test_slurm_two_hosts.py: the two
hosts a job runs on, and a spare that takes over when one of them dies.

Topology (addresses in 10.77.0.0/24 only):

* a bridge ``tmoe-br0`` in the root network namespace at 10.77.0.1/24, where slurmctld
  runs (``SlurmctldHost=<hostname -s>(10.77.0.1)``) and the test submits jobs;
* one network namespace per node (``tmoe-n1``, ``tmoe-n2``, ``tmoe-n3``), loopback up,
  with a veth end named ``tmoe0`` in each (so one ``GLOO_SOCKET_IFNAME`` fits all) at
  10.77.0.11, .12 and .13; the other ends (``tmoe-nX`` in the root namespace) are ports
  of the bridge: taking one down is pulling that node's cable;
* one slurmd per node, started in its network namespace with its own hostname (UTS
  namespace) and its own /etc/hosts (a bind mount in a private mount namespace; the
  machine's /etc/hosts is untouched). ``ip netns exec`` cannot be used: it remounts
  /sys, which hides /sys/fs/cgroup, and slurmd 22.05 then exits. Every process of a
  job (slurmstepd, the batch shell, srun, torchrun, the trainers) inherits the node's
  namespaces.

The hosts file names the controller and both nodes, with ``::ffff:`` forms for the
nodes: torch's c10d store listens dual-stack and reverse-resolves its peers' IPv4-mapped
addresses. Every node resolves every hostname to its own address, which torchrun needs
(it gives the workers the head's hostname as MASTER_ADDR).

Everything lives under a fixed folder (``BASE``) with fixed interface names, so that the
leftovers of a crashed run (daemons, namespaces, the bridge) are found and removed at the
next start. Processes are only ever ended by pid: the daemons this module started (pid
files it wrote, checked against their command line) and the processes inside its own
network namespaces.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from slurm_cluster import cluster_conf

BASE = Path("/tmp/tiedmoe-two-hosts")
BRIDGE = "tmoe-br0"
CONTROLLER_ADDR = "10.77.0.1"
NODES = {"n1": "10.77.0.11", "n2": "10.77.0.12", "n3": "10.77.0.13"}
IFNAME = "tmoe0"  # the veth end inside every node: GLOO_SOCKET_IFNAME
SLURMD_PORT = 6818  # the same on both nodes: they are separate network namespaces


def netns(node: str) -> str:
    return f"tmoe-{node}"


def host_veth(node: str) -> str:
    """The root-namespace end of the node's cable (a bridge port)."""
    return f"tmoe-{node}"


def run(*cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((CONTROLLER_ADDR, 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def namespace_pids(name: str) -> list[int]:
    """Pids of every process in network namespace ``name`` (as ``ip netns pids``)."""
    try:
        ns = os.stat(f"/run/netns/{name}")
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                st = os.stat(f"/proc/{entry}/ns/net")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (ns.st_dev, ns.st_ino):
                pids.append(int(entry))
    return pids


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _signal(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _kill_namespace(name: str) -> None:
    """SIGKILL every process of the namespace (thawing the frozen ones first)."""
    for _ in range(50):
        pids = namespace_pids(name)
        if not pids:
            return
        _signal(pids, signal.SIGCONT)
        _signal(pids, signal.SIGKILL)
        time.sleep(0.1)


def _kill_daemon(pid_file: Path, conf: Path) -> None:
    """End a daemon of a previous run by its pid file, if it is still ours."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    if str(conf) not in cmdline(pid):
        return
    _signal([pid], signal.SIGKILL)
    for _ in range(50):
        if not cmdline(pid):
            return
        time.sleep(0.1)


def remove_leftovers() -> None:
    """Remove what a previous (crashed) run left: daemons, namespaces, bridge."""
    conf = BASE / "slurm.conf"
    for pid_file in BASE.glob("*.pid") if BASE.exists() else []:
        _kill_daemon(pid_file, conf)
    for node in NODES:
        _kill_namespace(netns(node))
        if os.path.exists(f"/run/netns/{netns(node)}"):
            run("ip", "netns", "delete", netns(node), check=False)
        run("ip", "link", "delete", host_veth(node), check=False)
    run("ip", "link", "delete", BRIDGE, check=False)
    shutil.rmtree(BASE, ignore_errors=True)


class NamespaceCluster:
    """slurmctld on the root namespace + one slurmd in each node's namespace."""

    def __init__(self, slurmd_timeout: int = 10, extra_conf: tuple[str, ...] = ()):
        self.slurmd_timeout = slurmd_timeout
        self.extra_conf = extra_conf
        self.conf = BASE / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.daemons: dict[str, subprocess.Popen] = {}

    # -- setup and teardown ----------------------------------------------------------

    def start(self) -> None:
        remove_leftovers()
        BASE.mkdir(parents=True)
        (BASE / "state").mkdir()
        self._network()
        self._config()
        with open(BASE / "daemons.out", "ab") as log:  # the daemons keep their own copy of it
            self.daemons["slurmctld"] = subprocess.Popen(
                ["slurmctld", "-D", "-i", "-f", str(self.conf)], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
            for node in NODES:
                self.daemons[node] = subprocess.Popen(
                    [
                        "nsenter", f"--net=/run/netns/{netns(node)}",
                        "unshare", "--uts", "--mount", "--propagation", "private",
                        "sh", "-c",
                        f"hostname {node} && mount --bind {BASE / 'hosts'} /etc/hosts && exec slurmd -D -N {node} -f {self.conf}",
                    ],
                    env=self.env, stdout=log, stderr=subprocess.STDOUT,
                )
        try:
            wait_for(lambda: self.node_states() == dict.fromkeys(NODES, "idle"), 60, "every node idle")
        except TimeoutError:
            raise RuntimeError(f"SLURM did not come up: {self.node_states()}\n{self.logs()}") from None

    def stop(self) -> None:
        """Stop everything this started, by pid; remove the namespaces and the bridge.
        Safe to call after a partial start."""
        for node in NODES:
            _kill_namespace(netns(node))  # slurmd and every job process on the node
        ctld = self.daemons.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            ctld.terminate()
            try:
                ctld.wait(timeout=15)
            except subprocess.TimeoutExpired:
                ctld.kill()
                ctld.wait()
        for p in self.daemons.values():
            if p.poll() is None:
                p.kill()
            p.wait()
        for node in NODES:
            run("ip", "netns", "delete", netns(node), check=False)
            run("ip", "link", "delete", host_veth(node), check=False)
        run("ip", "link", "delete", BRIDGE, check=False)

    def _network(self) -> None:
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        run("ip", "addr", "add", f"{CONTROLLER_ADDR}/24", "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")
        for node, addr in NODES.items():
            ns = netns(node)
            run("ip", "netns", "add", ns)
            run("ip", "link", "add", host_veth(node), "type", "veth", "peer", "name", IFNAME, "netns", ns)
            run("ip", "link", "set", host_veth(node), "master", BRIDGE, "up")
            run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", IFNAME)
            run("ip", "-n", ns, "link", "set", IFNAME, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")

    def _config(self) -> None:
        short = socket.gethostname().split(".")[0]
        names = " ".join(dict.fromkeys([short, socket.gethostname()]))
        hosts = ["127.0.0.1 localhost", "::1 localhost", f"{CONTROLLER_ADDR} {names}"]
        hosts += [f"{addr} {node}" for node, addr in NODES.items()]
        hosts += [f"::ffff:{addr} {node}" for node, addr in NODES.items()]
        (BASE / "hosts").write_text("\n".join(hosts) + "\n")
        cores = os.cpu_count() or 2
        lines = [
            *cluster_conf(BASE, "tiedmoe2"),
            f"SlurmctldHost={short}({CONTROLLER_ADDR})",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={SLURMD_PORT}",
            # A node that stopped answering stays DOWN until `scontrol update ... resume`.
            # With 1 or 2 it returns as soon as it answers again, and the requeued job
            # (same id) can start there before the old run is gone from it: its stale
            # step, and the kill/signal RPCs for that job id that slurmctld could not
            # deliver and retries about 60 s later, which then hit the new run.
            "ReturnToService=0",
            # Job ids of their own: the single-node test's cluster starts at 1, and a
            # job may leave files named after its id in the submission folder.
            "FirstJobId=7701",
            f"SlurmdTimeout={self.slurmd_timeout}",
            *self.extra_conf,
        ]
        lines += [
            f"NodeName={node} NodeAddr={addr} NodeHostname={node} Sockets=1 CoresPerSocket={cores} ThreadsPerCore=1 State=UNKNOWN"
            for node, addr in NODES.items()
        ]
        lines.append(f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def logs(self, tail: int = 3000) -> str:
        out = []
        for name in ("slurmctld.log", *(f"slurmd-{node}.log" for node in NODES), "daemons.out"):
            path = BASE / name
            if path.exists():
                out.append(f"--- {name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def processes(self) -> str:
        """Every process of the nodes, with its state and where it waits (for failures)."""
        out = []
        for node in NODES:
            link = run("ip", "-br", "link", "show", host_veth(node), check=False).stdout.strip()
            out.append(f"--- {node} ({link})")
            for pid in self.pids(node):
                try:
                    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                    wchan = Path(f"/proc/{pid}/wchan").read_text()
                except OSError:
                    continue
                out.append(f"{pid} {state} {wchan or '-'} {cmdline(pid)[:160]}")
        return "\n".join(out)

    # -- SLURM -----------------------------------------------------------------------

    def slurm(self, *cmd: str, check: bool = True) -> str:
        return run(*cmd, env=self.env, check=check).stdout

    def node_states(self) -> dict[str, str]:
        """{node: state} as sinfo prints it (``idle``, ``alloc``, ``down*`` ...)."""
        out = self.slurm("sinfo", "-h", "-N", "-o", "%N %T", check=False)
        return dict(line.split() for line in out.splitlines() if len(line.split()) == 2)

    def job_field(self, job: str, field: str) -> str:
        out = self.slurm("scontrol", "show", "job", job, check=False)
        match = re.search(rf"\b{field}=(\S+)", out)
        return match.group(1) if match else ""

    def job_nodes(self, job: str) -> list[str]:
        """The nodes a job runs on, in order (the first one hosts the rendezvous)."""
        return self.slurm("scontrol", "show", "hostnames", self.job_field(job, "NodeList")).split()

    # -- what happens to a node ------------------------------------------------------

    def pids(self, node: str) -> list[int]:
        return namespace_pids(netns(node))

    def job_pids(self, node: str) -> list[int]:
        """The node's processes other than its slurmd (slurmstepd and the job's)."""
        slurmd = self.daemons[node].pid
        return [p for p in self.pids(node) if p != slurmd]

    def trainer_pids(self, node: str) -> list[int]:
        """The node's training processes (torchrun's workers, not torchrun)."""
        return [p for p in self.pids(node) if "-m tiedmoe_titan.train " in (c := cmdline(p)) and "torch.distributed.run" not in c]

    def freeze(self, node: str) -> None:
        """SIGSTOP every process of the node (slurmd included): a hung machine."""
        for _ in range(3):  # a process forked between listing and stopping is caught next
            _signal(self.pids(node), signal.SIGSTOP)
            time.sleep(0.05)

    def thaw(self, node: str) -> None:
        _signal(self.pids(node), signal.SIGCONT)

    def link(self, node: str, up: bool) -> None:
        """The node's cable: its bridge port (root-namespace veth end) up or down."""
        run("ip", "link", "set", host_veth(node), "up" if up else "down")
