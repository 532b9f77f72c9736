"""Two "hosts" on one machine that share nothing but S3 and the MLflow tracking server, for
end-to-end tests of the cluster path.

* The head host is this machine's network namespace. On the host end of a veth pair
  (``10.231.N.1/30``) it runs ``moto_server`` (S3, one bucket per fixture), ``mlflow server``
  (SQLite in the fixture's tmp dir, artifacts proxied to ``s3://<bucket>/mlartifacts``, so clients
  need no S3 credentials for MLflow) and a Ray head (dashboard, custom resource ``head_host``).
* The worker host is a network namespace of its own (``10.231.N.2/30``, the other end of the veth,
  ``lo`` up) in which a Ray worker node (custom resource ``worker_host``) runs in a private mount
  namespace: empty tmpfs over ``<project>/{data,models,checkpoints,samples,mlruns}``, over the
  fixture's tmp dir and over the head's Ray temp dir, an empty file over ``<project>/mlflow.db``
  (when there is one). It still sees the code and the .venv, and reaches the head only over the
  veth: S3 and MLflow through the URLs in its environment, Ray through the GCS/raylet ports.

Use the ``two_hosts`` fixture (module scope)::

    from hosts import two_hosts  # noqa: F401  (importing a fixture makes it usable in the module)

    def test_something(two_hosts):
        env = two_hosts.driver_env()   # os.environ + RAY_ADDRESS=<dashboard>, AWS_*, MLFLOW_TRACKING_URI
        subprocess.run([".venv/bin/ray", "job", "submit", "--working-dir", d, "--", "python", "x.py"],
                       env=env, check=True)
        old = two_hosts.worker_node_ids()[0]
        two_hosts.kill_worker_host(); two_hosts.wait_node_state(old, "DEAD")
        new = two_hosts.start_worker_host()

or the context manager ``with TwoHosts(project_root, tmp) as hosts: ...`` directly. Needs root
(``ip netns``, ``unshare -m``); where namespaces cannot be made the fixture fails under CI
(``CI=true``) and skips elsewhere, naming what is missing.

Ray limits what "bind to the veth address only" can mean: its C++ gRPC servers (GCS, raylet node
and object manager, agent gRPC) and its Prometheus exporters bind the wildcard address whenever the
node IP is not 127.0.0.1 (hard-coded in Ray 2.60). All their ports are chosen free and explicit
here, so they clash with nothing; on the worker host the wildcard is the namespace's own.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MISSING_TOOL_ENV = "DIT_TEST_HOSTS_MISSING"  # comma-separated tools to treat as absent (tests of the fixture)
SUBNET = "10.231"  # 10.231.N.0/30, N in 1..254, one N per live fixture (claimed by creating the veth)
HIDDEN_DIRS = ("data", "models", "checkpoints", "samples", "mlruns")
HIDDEN_FILES = ("mlflow.db",)
_NS_RE = re.compile(r"^twohosts(\d+)-(\d+)$")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an HTTP proxy


class HostsUnavailable(RuntimeError):
    """Network/mount namespaces cannot be made here (not root, no ``ip``/``unshare``, EPERM)."""


class _StartFailed(RuntimeError):
    pass


# ------------------------------------------------------------------------------------ processes
def _run(cmd: list[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, comm) of every process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            table[int(entry.name)] = (int(stat[stat.rindex(")") + 2:].split()[1]), comm)
    return table


def _tree(root: int, table: dict[int, tuple[int, str]] | None = None) -> set[int]:
    """``root`` and its descendants (those that exist)."""
    table = _proc_table() if table is None else table
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    tree, todo = set(), [root]
    while todo:
        p = todo.pop()
        if p not in tree:
            tree.add(p)
            todo += kids.get(p, [])
    return {p for p in tree if p in table}


def kill_tree(root: int) -> list[int]:
    """SIGSTOP ``root`` and all its descendants (so that none forks or is re-parented while we
    look), then SIGKILL them all. Process groups are not enough: Ray gives each worker its own."""
    seen: set[int] = set()
    for _ in range(50):
        new = _tree(root) - seen
        if not new:
            break
        for p in new:
            try:
                os.kill(p, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        seen |= new
    for p in seen:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return sorted(seen)


def netns_pids(ns: str) -> list[int]:
    """Pids of every process whose network namespace is ``ns``."""
    proc = _run(["ip", "netns", "pids", ns], check=False)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def _kill_netns(ns: str, timeout: float = 15) -> None:
    deadline = time.time() + timeout
    while pids := netns_pids(ns):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.time() > deadline:
            raise RuntimeError(f"processes still in netns {ns} after SIGKILL: {pids}")
        time.sleep(0.1)


def _reclaim_stale() -> None:
    """Delete namespaces (and their veth) left by fixtures whose process died without cleanup."""
    for line in _run(["ip", "netns", "list"], check=False).stdout.splitlines():
        m = _NS_RE.match(line.split()[0]) if line.strip() else None
        if m and not _pid_alive(int(m.group(2))):
            try:
                _kill_netns(m.group(0))
            except RuntimeError:
                continue
            _run(["ip", "netns", "del", m.group(0)], check=False)
            _run(["ip", "link", "del", f"th{m.group(1)}h"], check=False)


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# ------------------------------------------------------------------------------------ the hosts
class TwoHosts:
    """Context manager: on enter the network, S3, MLflow and both Ray nodes are up; on exit all of
    it is stopped and removed (also when enter fails half-way).

    Attributes once entered: ``ns`` (netns name), ``host_ip`` / ``worker_ip`` (veth addresses),
    ``bucket``, ``s3_endpoint``, ``mlflow_uri``, ``dashboard`` (``http://host_ip:port``: the job
    submission and state API address), ``gcs_address`` (``host_ip:port``), ``head_node_id``,
    ``worker_node_id`` (the current worker node), ``tmp`` (head-only dir, hidden from the worker),
    ``project_root``, ``logs`` (process logs; Ray's own logs are copied there at exit when ``tmp``
    was given), ``worker_proc`` (the worker's ``ray start``, None while killed).

    ``fast_failure_detection`` lowers the GCS health-check period so that a killed node is DEAD
    after about 5 s (with Ray's defaults: about 16 s). A Ray node whose agents start too slowly (the
    raylet aborts when its dashboard agent has not written its port file within 15 s, which
    happens on a loaded 2-CPU machine) is started again, up to ``start_attempts`` times.
    """

    def __init__(self, project_root: str | os.PathLike = REPO, tmp: str | os.PathLike | None = None, *,
                 num_cpus: int = 2, object_store_memory: int = 100 * 1024 * 1024,
                 hidden_dirs: tuple[str, ...] = HIDDEN_DIRS, hidden_files: tuple[str, ...] = HIDDEN_FILES,
                 fast_failure_detection: bool = True, start_timeout: float = 90, start_attempts: int = 3):
        self.project_root = Path(project_root).resolve()
        self._own_tmp = tmp is None
        self.tmp: Path | None = Path(tmp).resolve() if tmp is not None else None
        self.num_cpus = num_cpus
        self.object_store_memory = object_store_memory
        self.hidden_dirs = tuple(hidden_dirs)
        self.hidden_files = tuple(hidden_files)
        self.fast_failure_detection = fast_failure_detection
        self.start_timeout = start_timeout
        self.start_attempts = start_attempts
        self.n: int | None = None
        self.ns = self.host_if = self.ns_if = self.host_ip = self.worker_ip = ""
        self.bucket = f"twohosts-{uuid.uuid4().hex[:12]}"
        self.s3_endpoint = self.mlflow_uri = self.dashboard = self.gcs_address = ""
        self.head_node_id = self.worker_node_id = ""
        self.logs: Path | None = None
        self.head_proc: subprocess.Popen | None = None
        self.worker_proc: subprocess.Popen | None = None
        self._procs: dict[str, subprocess.Popen] = {}  # moto, mlflow
        self._worker_starts = 0
        self._head_starts = 0
        self._ray_temp_dirs: list[Path] = []
        self._head_temp_dir: Path | None = None
        self._created_dirs: list[Path] = []
        self._used_ports: set[int] = set()
        self._log_files: list[Any] = []

    # ---------------------------------------------------------------- environment of clients
    def aws_env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def job_env(self) -> dict[str, str]:
        """What a driver on the head host side ("the user's laptop") sets: the dashboard as
        RAY_ADDRESS, the cluster's auth mode, S3 and the tracking server."""
        return {"RAY_ADDRESS": self.dashboard, "RAY_AUTH_MODE": "disabled", **self.aws_env(),
                "MLFLOW_TRACKING_URI": self.mlflow_uri}

    def driver_env(self) -> dict[str, str]:
        """``os.environ`` less RAY_*/AWS_*/MLFLOW_* (other fixtures set some), the venv first on
        PATH, plus :meth:`job_env`: the env of a ``ray job submit`` or driver subprocess."""
        return {**self._base_env(), **self.job_env()}

    def s3_client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def mlflow_client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.mlflow_uri, registry_uri=self.mlflow_uri)

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> "TwoHosts":
        try:
            self._check_possible()
            if self.tmp is None:
                self.tmp = Path(tempfile.mkdtemp(prefix="twohosts-"))
            self.tmp.mkdir(parents=True, exist_ok=True)
            self.logs = self.tmp / "logs"
            self.logs.mkdir(exist_ok=True)
            self._make_network()
            # S3 and MLflow start side by side, the Ray head beside MLflow's last seconds. (Not all
            # at once: a raylet aborts when its dashboard agent needs more than 15 s to start.)
            moto = self._start_moto()
            mlflow = self._start_mlflow()
            self._wait_http(f"{self.s3_endpoint}/moto-api/", moto, self.logs / "moto.log")
            self.s3_client().create_bucket(Bucket=self.bucket)
            self._start_head()
            self.start_worker_host()
            self._wait_http(f"{self.mlflow_uri}/health", mlflow, self.logs / "mlflow.log")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop everything started, delete the namespace and veth, remove the temp dirs. Safe to
        call twice and after a partial start."""
        errors: list[str] = []

        def attempt(what, fn, *args):
            try:
                fn(*args)
            except Exception as e:  # keep going: every later step must still run
                errors.append(f"{what}: {e!r}")

        attempt("worker host", self.kill_worker_host)
        if self.head_proc is not None:
            attempt("ray head", self._kill_proc, self.head_proc)
            self.head_proc = None
        for name in ("mlflow", "moto"):
            if name in self._procs:
                attempt(name, self._kill_proc, self._procs.pop(name))
        for d in self._ray_temp_dirs:
            attempt(f"processes of {d}", self._kill_by_cmdline, str(d))
        if self.ns:
            attempt("netns del", _run, ["ip", "netns", "del", self.ns])
            self.ns = ""
        if self.host_if:
            _run(["ip", "link", "del", self.host_if], check=False)  # normally gone with the netns
            self.host_if = ""
        for f in self._log_files:
            f.close()
        self._log_files.clear()
        for d in self._ray_temp_dirs:
            attempt(f"logs of {d}", self._save_ray_logs, d)
            shutil.rmtree(d, ignore_errors=True)
        self._ray_temp_dirs.clear()
        for d in reversed(self._created_dirs):
            try:
                d.rmdir()  # only when still empty: never remove what someone else put there
            except OSError:
                pass
        self._created_dirs.clear()
        if self._own_tmp and self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if errors:
            print("TwoHosts cleanup problems:\n  " + "\n  ".join(errors), file=sys.stderr)

    # ---------------------------------------------------------------- worker host
    def start_worker_host(self, timeout: float | None = None) -> str:
        """Start the worker node in the namespace (a fresh mount namespace with empty data dirs, a
        fresh temp dir and fresh ports: a rebooted host) and wait until the head sees it ALIVE;
        returns its node id."""
        if self.worker_proc is not None:
            raise RuntimeError("the worker host is running: kill_worker_host() first")
        self._mount_points()
        env = {**self._base_env(), **self._ray_env(), **self.aws_env(), "MLFLOW_TRACKING_URI": self.mlflow_uri,
               # torch.distributed's gloo binds the interface of the host's name (127.0.0.1 here): the
               # cluster NIC instead, as on a real host with several interfaces
               "GLOO_SOCKET_IFNAME": self.ns_if}
        errors = []
        for _ in range(self.start_attempts):
            self._worker_starts += 1
            k = self._worker_starts
            base = 20000 + ((k - 1) % 100) * 100  # the namespace holds nothing else: any port is free
            temp_dir = Path("/tmp") / f"thw{self.n}x{k}"
            self._ray_temp_dirs.append(temp_dir)
            ray_cmd = [
                str(BIN / "ray"), "start", f"--address={self.gcs_address}", "--block",
                f"--node-ip-address={self.worker_ip}", f"--num-cpus={self.num_cpus}",
                "--resources=" + json.dumps({"worker_host": 1}),
                f"--node-manager-port={base}", f"--object-manager-port={base + 1}",
                f"--dashboard-agent-listen-port={base + 2}", f"--dashboard-agent-grpc-port={base + 3}",
                f"--metrics-export-port={base + 4}", f"--runtime-env-agent-port={base + 5}",
                f"--min-worker-port={base + 10}", f"--max-worker-port={base + 99}",
                f"--object-store-memory={self.object_store_memory}",
                f"--temp-dir={temp_dir}", "--disable-usage-stats", "--log-style=record",
            ]
            script = "set -e\n" + "\n".join(self._mount_commands()) + "\nexec " + shlex.join(ray_cmd)
            cmd = ["ip", "netns", "exec", self.ns, "unshare", "-m", "--propagation", "private", "sh", "-c", script]
            log = self.logs / f"worker-{k}.log"
            self.worker_proc = self._popen(cmd, env, log, cwd="/")
            try:
                self.worker_node_id = self._wait_ray_node(self.worker_proc, self.worker_ip, log, timeout)
                return self.worker_node_id
            except _StartFailed as e:
                errors.append(str(e))
                self.kill_worker_host()
        raise RuntimeError(f"the worker host did not start in {self.start_attempts} attempts:\n" + "\n".join(errors))

    def kill_worker_host(self) -> list[int]:
        """SIGKILL the worker host: the process tree and group of its ``ray start`` (raylet, agents,
        workers) and every other process in the namespace. Returns the pids killed. The head notices
        by its health checks: see :meth:`wait_node_state`."""
        proc, self.worker_proc = self.worker_proc, None
        killed = self._kill_proc(proc, wait=False) if proc is not None else []
        if self.ns:
            killed += [p for p in netns_pids(self.ns) if p not in killed]
            _kill_netns(self.ns)
        if proc is not None:
            proc.wait(timeout=30)
        return killed

    def _mount_points(self) -> None:
        for name in self.hidden_dirs:
            d = self.project_root / name
            if not d.exists():
                d.mkdir(parents=True)
                self._created_dirs.append(d)

    def _mount_commands(self) -> list[str]:
        q = shlex.quote
        cmds = [f"mount -t tmpfs -o mode=0755,size=2g twohosts {q(str(self.project_root / name))}"
                for name in self.hidden_dirs]
        cmds.append(f"mount -t tmpfs -o mode=0700,size=256m twohosts {q(str(self.tmp))}")
        if self._head_temp_dir is not None:  # the head's Ray session (its logs, its unpacked working dirs)
            cmds.append(f"mount -t tmpfs -o mode=0700,size=16m twohosts {q(str(self._head_temp_dir))}")
        empty = self.tmp / ".empty"  # in the worker's own tmpfs
        for name in self.hidden_files:
            f = self.project_root / name
            if f.is_file():  # hide it if it is there; never create it
                cmds.append(f"touch {q(str(empty))}; mount --bind {q(str(empty))} {q(str(f))}")
        return cmds

    # ---------------------------------------------------------------- cluster state (dashboard)
    def _get(self, path: str, timeout: float = 10) -> Any:
        with _OPENER.open(f"{self.dashboard}{path}", timeout=timeout) as r:
            return json.loads(r.read())

    def nodes(self) -> list[dict[str, Any]]:
        """Every node the head knows, alive and dead, from the state API (node_id, node_ip, state,
        resources_total, ...)."""
        return self._get("/api/v0/nodes?limit=1000&detail=true")["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict[str, Any]]:
        return [n for n in self.nodes() if n.get("state") == "ALIVE"]

    def worker_node_ids(self) -> list[str]:
        """Ids of the worker host's live nodes (one, or none while it is killed)."""
        return [n["node_id"] for n in self.alive_nodes() if n.get("node_ip") == self.worker_ip]

    def node_state(self, node_id: str) -> str | None:
        return next((n.get("state") for n in self.nodes() if n["node_id"] == node_id), None)

    def wait_node_state(self, node_id: str, state: str = "DEAD", timeout: float = 60) -> float:
        """Wait until the head reports ``node_id`` in ``state``; returns the seconds it took."""
        t0 = time.time()
        while (s := self.node_state(node_id)) != state:
            if time.time() - t0 > timeout:
                raise TimeoutError(f"node {node_id} is {s}, not {state}, after {timeout}s")
            time.sleep(0.25)
        return time.time() - t0

    def job(self, submission_id: str) -> dict[str, Any]:
        return self._get(f"/api/jobs/{submission_id}")

    def job_logs(self, submission_id: str) -> str:
        return self._get(f"/api/jobs/{submission_id}/logs")["logs"]

    # ---------------------------------------------------------------- internals
    def _check_possible(self) -> None:
        if os.geteuid() != 0:
            raise HostsUnavailable("network namespaces need root")
        # MISSING_TOOL_ENV stands in for a missing tool, so that a test can show what CI does then
        missing = set(filter(None, os.environ.get(MISSING_TOOL_ENV, "").split(",")))
        for tool in ("ip", "unshare", "mount"):
            if tool in missing or shutil.which(tool) is None:
                raise HostsUnavailable(f"`{tool}` is not installed (Debian: apt-get install iproute2 util-linux mount)")
        for tool in ("ray", "moto_server", "mlflow"):
            if not (BIN / tool).exists():
                raise HostsUnavailable(f"{BIN / tool} is missing")

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
        env["PATH"] = f"{BIN}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        for k in ("NO_PROXY", "no_proxy"):  # the veth addresses are never behind a proxy
            env[k] = ",".join(filter(None, [env.get(k, ""), self.host_ip, self.worker_ip, "127.0.0.1", "localhost"]))
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        return env

    @staticmethod
    def _ray_env() -> dict[str, str]:
        # Every Ray process of both hosts and every client: token auth off (the default of a new
        # local cluster in Ray 2.60 is on; mixing modes fails).
        return {"RAY_AUTH_MODE": "disabled"}

    def _popen(self, cmd: list[str], env: dict[str, str], log: Path, cwd: str) -> subprocess.Popen:
        f = log.open("w")
        self._log_files.append(f)
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=cwd)

    def _make_network(self) -> None:
        _reclaim_stale()
        taken = _run(["ip", "-4", "-o", "addr"], check=False).stdout + _run(["ip", "-4", "route"], check=False).stdout
        for n in random.sample(range(1, 255), 254):
            if f"{SUBNET}.{n}." in taken:
                continue
            host_if, ns_if = f"th{n}h", f"th{n}n"
            # The veth's name is the claim on N: creating it is atomic, so two runs never share N.
            proc = _run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if], check=False)
            if proc.returncode == 0:
                break
            if "exists" in proc.stderr:
                continue
            raise HostsUnavailable(f"cannot create a veth pair: {proc.stderr.strip()}")
        else:
            raise HostsUnavailable(f"no free {SUBNET}.N.0/30 subnet")
        self.n, self.host_if, self.ns_if = n, host_if, ns_if
        self.host_ip, self.worker_ip = f"{SUBNET}.{n}.1", f"{SUBNET}.{n}.2"
        ns = f"twohosts{n}-{os.getpid()}"
        proc = _run(["ip", "netns", "add", ns], check=False)
        if proc.returncode != 0:
            raise HostsUnavailable(f"ip netns add failed: {proc.stderr.strip()}")
        self.ns = ns
        for cmd in (["ip", "link", "set", ns_if, "netns", ns],
                    ["ip", "addr", "add", f"{self.host_ip}/30", "dev", host_if],
                    ["ip", "link", "set", host_if, "up"],
                    ["ip", "-n", ns, "addr", "add", f"{self.worker_ip}/30", "dev", ns_if],
                    ["ip", "-n", ns, "link", "set", ns_if, "up"],
                    ["ip", "-n", ns, "link", "set", "lo", "up"]):
            proc = _run(cmd, check=False)
            if proc.returncode != 0:
                raise HostsUnavailable(f"{shlex.join(cmd)}: {proc.stderr.strip()}")
        t = shlex.quote(str(self.tmp))
        proc = _run(["ip", "netns", "exec", ns, "unshare", "-m", "--propagation", "private", "sh", "-c",
                     f'mount -t tmpfs twohosts {t} && test -z "$(ls -A {t})"'], check=False)
        if proc.returncode != 0:
            raise HostsUnavailable(f"cannot mount a tmpfs in a new mount namespace: {proc.stderr.strip()}")
        deadline = time.time() + 10
        while "LOWER_UP" not in _run(["ip", "-o", "link", "show", host_if], check=False).stdout:
            if time.time() > deadline:
                raise RuntimeError(f"veth {host_if} has no carrier")
            time.sleep(0.05)

    def _free_port(self) -> int:
        """A port free on every address of this host (bound on the wildcard, then released), so it
        clashes neither with this fixture's servers nor with a cluster on 127.0.0.1."""
        for _ in range(100):
            with socket.socket() as s:
                s.bind(("", 0))
                port = s.getsockname()[1]
            if port not in self._used_ports:
                self._used_ports.add(port)
                return port
        raise RuntimeError("no free port")

    def _port_block(self, size: int = 100) -> int:
        """``size`` consecutive free ports in 20000-31999: below the ephemeral range (where
        _free_port's come from) and above Ray's default worker ports (10002-19999)."""
        for _ in range(200):
            base = random.randrange(20000, 32000 - size)
            if any(p in self._used_ports for p in range(base, base + size)):
                continue
            for p in range(base, base + size):
                with socket.socket() as s:
                    try:
                        s.bind(("", p))
                    except OSError:
                        break
            else:
                self._used_ports.update(range(base, base + size))
                return base
        raise RuntimeError("no block of free ports")

    def _wait_http(self, url: str, proc: subprocess.Popen, log: Path, timeout: float | None = None) -> None:
        deadline = time.time() + (timeout or self.start_timeout)
        while True:
            try:
                with _OPENER.open(url, timeout=5):
                    return
            except urllib.error.HTTPError:
                return  # something answers
            except OSError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}); {log}:\n{_tail(log)}")
            if time.time() > deadline:
                raise TimeoutError(f"nothing answers at {url} after {timeout or self.start_timeout}s; "
                                   f"{log}:\n{_tail(log)}")
            time.sleep(0.2)

    def _start_moto(self) -> subprocess.Popen:
        port = self._free_port()
        self.s3_endpoint = f"http://{self.host_ip}:{port}"
        cmd = [str(BIN / "moto_server"), "-H", self.host_ip, "-p", str(port)]
        proc = self._procs["moto"] = self._popen(cmd, self._base_env(), self.logs / "moto.log", cwd=str(self.tmp))
        return proc

    def _start_mlflow(self) -> subprocess.Popen:
        port = self._free_port()
        self.mlflow_uri = f"http://{self.host_ip}:{port}"
        cmd = [str(BIN / "mlflow"), "server",
               "--backend-store-uri", f"sqlite:///{self.tmp / 'mlflow.db'}",
               "--artifacts-destination", f"s3://{self.bucket}/mlartifacts",  # --serve-artifacts is the default
               "--host", self.host_ip, "--port", str(port), "--workers", "1",
               # MLflow 3's Host-header check lets private IPs in by default; said explicitly here.
               "--allowed-hosts", f"{self.host_ip}:{port},{self.host_ip}"]
        env = {**self._base_env(), **self.aws_env()}
        proc = self._procs["mlflow"] = self._popen(cmd, env, self.logs / "mlflow.log", cwd=str(self.tmp))
        return proc

    def _start_head(self) -> None:
        errors = []
        for _ in range(self.start_attempts):
            self._head_starts += 1
            dash, gcs = self._free_port(), self._free_port()
            base = self._port_block()
            temp_dir = self._head_temp_dir = Path("/tmp") / f"thh{dash}"
            self._ray_temp_dirs.append(temp_dir)
            self.dashboard = f"http://{self.host_ip}:{dash}"
            self.gcs_address = f"{self.host_ip}:{gcs}"
            cmd = [
                str(BIN / "ray"), "start", "--head", "--block", f"--node-ip-address={self.host_ip}", f"--port={gcs}",
                f"--num-cpus={self.num_cpus}", "--resources=" + json.dumps({"head_host": 1}),
                "--include-dashboard=true", f"--dashboard-host={self.host_ip}", f"--dashboard-port={dash}",
                f"--ray-client-server-port={self._free_port()}",
                f"--dashboard-agent-listen-port={self._free_port()}",
                f"--dashboard-agent-grpc-port={self._free_port()}",
                f"--metrics-export-port={self._free_port()}", f"--runtime-env-agent-port={self._free_port()}",
                f"--node-manager-port={self._free_port()}", f"--object-manager-port={self._free_port()}",
                f"--min-worker-port={base}", f"--max-worker-port={base + 99}",
                f"--object-store-memory={self.object_store_memory}",
                f"--temp-dir={temp_dir}", "--disable-usage-stats", "--log-style=record",
            ]
            env = {**self._base_env(), **self._ray_env(), **self.aws_env(), "MLFLOW_TRACKING_URI": self.mlflow_uri,
                   "GLOO_SOCKET_IFNAME": self.host_if,
                   # The dashboard's and the autoscaler's Prometheus servers have fixed ports (44227,
                   # 44217) on the wildcard address: free ones, so other clusters here do not clash.
                   "DASHBOARD_METRIC_PORT": str(self._free_port()),
                   "AUTOSCALER_METRIC_PORT": str(self._free_port())}
            if self.fast_failure_detection:  # a killed node is DEAD after ~5 s instead of ~16 s
                env.update(RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="1000",
                           RAY_health_check_failure_threshold="5", RAY_health_check_initial_delay_ms="1000")
            log = self.logs / f"ray-head-{self._head_starts}.log"
            self.head_proc = self._popen(cmd, env, log, cwd=str(self.tmp))
            try:
                self.head_node_id = self._wait_ray_node(self.head_proc, self.host_ip, log, None)
                return
            except _StartFailed as e:
                errors.append(str(e))
                self._kill_proc(self.head_proc)
                self._kill_by_cmdline(str(temp_dir))
                self.head_proc = None
        raise RuntimeError(f"the Ray head did not start in {self.start_attempts} attempts:\n" + "\n".join(errors))

    def _wait_ray_node(self, proc: subprocess.Popen, ip: str, log: Path, timeout: float | None) -> str:
        """Wait until a node with ``ip`` that was not there before is ALIVE on the head; fail fast
        when the ``ray start`` exits or its raylet dies (agents too slow to start)."""
        known = set()
        if ip != self.host_ip:
            known = {n["node_id"] for n in self.nodes()}
        timeout = timeout or self.start_timeout
        deadline = time.time() + timeout
        raylet_seen = False
        while True:
            try:
                for n in self.nodes():
                    if n["node_id"] not in known and n.get("node_ip") == ip and n.get("state") == "ALIVE":
                        return n["node_id"]
            except (OSError, KeyError, ValueError):
                pass  # the dashboard is not up yet
            table = _proc_table()
            raylet = any(table[p][1] == "raylet" for p in _tree(proc.pid, table))
            raylet_seen |= raylet
            if proc.poll() is not None:
                raise _StartFailed(f"`ray start` exited ({proc.returncode}); {log}:\n{_tail(log, 1500)}")
            if raylet_seen and not raylet:
                raise _StartFailed(f"the raylet died during start-up; {log}:\n{_tail(log, 1500)}")
            if time.time() > deadline:
                raise _StartFailed(f"no live node {ip} after {timeout}s; {log}:\n{_tail(log, 1500)}")
            time.sleep(0.5)

    @staticmethod
    def _kill_proc(proc: subprocess.Popen, wait: bool = True) -> list[int]:
        """SIGKILL a process's tree, then its process group."""
        killed = kill_tree(proc.pid)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if wait:
            proc.wait(timeout=30)
        return killed

    @staticmethod
    def _kill_by_cmdline(needle: str) -> None:
        """SIGKILL what still names this fixture's own Ray temp dir on its command line (every Ray
        process does until it renames itself), in case one left the process tree."""
        me = os.getpid()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(a.decode(errors="replace").endswith(needle) or needle + "/" in a.decode(errors="replace")
                   for a in args):
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _save_ray_logs(self, temp_dir: Path) -> None:
        """Keep Ray's own logs (gcs_server, raylet, agents, job drivers) beside the process logs."""
        if self._own_tmp or self.logs is None:
            return
        for session in temp_dir.glob("session_2*"):
            if (session / "logs").is_dir():
                shutil.copytree(session / "logs", self.logs / temp_dir.name, ignore_dangling_symlinks=True,
                                dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.sock", "events", "export_events"))


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def unavailable(reason: str) -> None:
    """Fail under CI, skip elsewhere: the two-host tests are the evidence of the cluster claims."""
    message = f"two hosts unavailable: {reason}"
    if in_ci():
        pytest.fail(f"{message} (CI=true: the multi-host tests may not be skipped; run CI as root with ip, unshare and mount)",
                    pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory) -> Iterator[TwoHosts]:
    """:class:`TwoHosts` for the project at the repository root, shared by a test module. Where
    namespaces cannot be made it fails under CI (``CI=true``: the multi-host evidence must not be
    skipped silently) and skips elsewhere, with the same message."""
    hosts = TwoHosts(REPO, tmp_path_factory.mktemp("twohosts"))
    try:
        hosts.__enter__()
    except HostsUnavailable as e:
        unavailable(str(e))
    try:
        yield hosts
    finally:
        hosts.close()
