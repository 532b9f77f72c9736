"""Where the jobs run: the one Ray initialisation, the environment forwarded to workers, what
hosts of a cluster share, and job submission to a remote cluster.

On a cluster, hosts share nothing but the object store (S3) and the MLflow tracking server. Every
job checks, before any work starts, that what its workers read and write is reachable from every
host (``require_shared``), and says what to use instead when it is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from . import storage

REPO = Path(__file__).resolve().parents[1]
# Set to 1 when every host of the cluster mounts the same filesystem at the same paths (NFS, Lustre):
# then local paths and a SQLite tracking file are shared too.
SHARED_FS_ENV = "DIT_SHARED_FS"
# Environment a worker needs and Ray does not forward by itself (credentials stay out of config).
FORWARDED_ENV_PREFIXES = ("AWS_", "MLFLOW_")
# What a job submitted to a remote cluster takes along: where to track; S3 access is the cluster's own.
JOB_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
JOB_POLL_S = 2.0
JOB_STOP_WAIT_S = 30.0


def use_assigned_cpus() -> None:
    """Inside a Ray actor on CPUs: as many PyTorch threads as the actor was given CPUs (rounded, at
    least one), so that actors sharing a node do not oversubscribe its cores. Elsewhere (a GPU, the
    driver, plain Python): nothing."""
    import ray

    if torch.cuda.is_available() or not ray.is_initialized():
        return
    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:
        return
    torch.set_num_threads(max(1, round(context.get_assigned_resources().get("CPU", 1))))


def is_job_server(address: str | None) -> bool:
    """A dashboard address (``http://head:8265``): stages submit Ray jobs there."""
    return bool(address) and str(address).startswith(("http://", "https://"))


def init_ray() -> None:
    """Connect to ``RAY_ADDRESS`` when set (inside a Ray job it is the job's own cluster); otherwise
    start a private local runtime (``address="local"`` never joins another cluster on this machine)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if is_job_server(address):
        raise ValueError(f"RAY_ADDRESS={address} is a job server (dashboard) address: run the DVC stage "
                         "(it submits a Ray job there) or `ray job submit`, not the job module directly")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", include_dashboard=False, configure_logging=False, log_to_driver=True)


def forwarded_env(tracking_uri: str) -> dict[str, str]:
    """The ``AWS_*`` and ``MLFLOW_*`` variables of this process, for workers' runtime environment,
    with the tracking URI this process uses (a worker must log where the driver reads)."""
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    env.setdefault("MLFLOW_TRACKING_URI", tracking_uri)
    return env


# ---------------------------------------------------------------------------------------------
# What the hosts of a cluster share
# ---------------------------------------------------------------------------------------------

def shared_filesystem() -> bool:
    return os.environ.get(SHARED_FS_ENV, "").strip().lower() in ("1", "true", "yes")


def cluster_hosts() -> int:
    """Distinct hosts (node IP addresses) among the alive nodes of the connected cluster: several
    raylets on one machine are one host and share its filesystem."""
    import ray

    return len({n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}) or 1


def is_local_tracking(uri: str) -> bool:
    """A tracking URI that is a file of this host (``sqlite:``, ``file:`` or a plain path)."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def require_shared(paths: Mapping[str, str | None], hosts: int, where: str, tracking: str | None = None) -> None:
    """Refuse, before any work, a local path among ``paths`` (setting name -> value) or a local
    tracking URI when the job's workers run on ``hosts`` > 1 hosts that share no filesystem
    (``where`` says which: "the Ray cluster", "the remote Ray cluster at http://...")."""
    if hosts <= 1 or shared_filesystem():
        return
    for name, value in paths.items():
        if value and not storage.is_s3(value):
            raise ValueError(
                f"{name}={value!r} is a local path, but {where} has {hosts if hosts < REMOTE else 'other'} hosts that "
                f"do not share this host's files: use an s3:// URI (e.g. `dvc exp run -S store.root=s3://<bucket>/<prefix>`), "
                f"or set {SHARED_FS_ENV}=1 if every host mounts this path")
    if tracking is not None and is_local_tracking(tracking):
        raise ValueError(
            f"MLFLOW_TRACKING_URI={tracking!r} is a file on this host, but {where} has workers on other hosts "
            "that log and register there: run a tracking server (`mlflow server --artifacts-destination "
            "s3://<bucket>/mlartifacts ...`) and set MLFLOW_TRACKING_URI=http://<server>:5000, "
            f"or set {SHARED_FS_ENV}=1 if every host mounts this file")


REMOTE = 1 << 30  # ``hosts`` for a remote cluster: however many hosts it has, none is this one
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"   # set by Ray for the driver of a submitted job


def job_working_dir() -> Path | None:
    """Inside a submitted Ray job that ships a working dir: that (temporary) copy, the cwd."""
    import json

    try:
        runtime_env = json.loads(os.environ.get(JOB_CONFIG_ENV) or "{}").get("runtime_env") or {}
    except ValueError:
        return None
    return Path.cwd().resolve() if runtime_env.get("working_dir") else None


def require_persistent(paths: Mapping[str, str | None], tracking: str | None = None) -> None:
    """Refuse outputs that would land in a submitted job's temporary copy of the working dir (Ray
    deletes it with the session): a relative output path, or the default SQLite tracking file."""
    work = job_working_dir()
    if work is None:
        return
    for name, value in paths.items():
        if value and not storage.is_s3(value) and Path(value).absolute().resolve().is_relative_to(work):
            raise ValueError(
                f"{name}={value!r} is inside this Ray job's temporary copy of the working dir ({work}), which Ray "
                "deletes: use an s3:// URI (or an absolute path that every node keeps)")
    if tracking is not None and is_local_tracking(tracking) and str(work) in tracking:
        raise ValueError(
            f"MLFLOW_TRACKING_URI is {tracking!r}, inside this Ray job's temporary working dir: pass the "
            "tracking server with the job (`--runtime-env-json '{\"env_vars\": {\"MLFLOW_TRACKING_URI\": \"http://...\"}}'`)")


# ---------------------------------------------------------------------------------------------
# Ray jobs on a remote cluster
# ---------------------------------------------------------------------------------------------

def submit_job(address: str, entrypoint: str, name: str, working_dir: str | os.PathLike = REPO,
               env: Mapping[str, str] | None = None, log: Any = print) -> str:
    """Run ``entrypoint`` as a Ray job on the cluster whose dashboard is ``address``, the project
    shipped as its working dir (Ray leaves out what .gitignore ignores); stream its logs; wait.
    Returns the job id; raises naming the job when it does not succeed. Ctrl-C or SIGTERM while
    waiting stops the job on the cluster (waiting up to JOB_STOP_WAIT_S for STOPPED), says so on
    stderr, then exits 130 (Ctrl-C) or 143 (SIGTERM)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    job_env = {k: os.environ[k] for k in JOB_ENV if os.environ.get(k)}
    job_env.update(env or {})
    job_id = client.submit_job(
        entrypoint=entrypoint,
        submission_id=f"dit-{name}-{uuid.uuid4().hex[:8]}",
        runtime_env={"working_dir": str(working_dir), "env_vars": job_env},
    )
    log(f"{name}: submitted Ray job {job_id} to {address}: {entrypoint}")
    try:
        with _signals_interrupt():
            status = _follow(client, job_id, name, log)
    except KeyboardInterrupt as interrupt:
        _stop_job(client, job_id, name, address)
        # the shell's code for death by that signal, without a traceback: the message above says what happened
        raise SystemExit(128 + (signal.SIGTERM if isinstance(interrupt, _Terminated) else signal.SIGINT)) from None
    if status != JobStatus.SUCCEEDED:
        info = client.get_job_info(job_id)
        raise RuntimeError(f"Ray job {job_id} ({name}) on {address} ended {status}: {info.message}; "
                           f"see `ray job logs {job_id} --address {address}`")
    return job_id


def _follow(client: Any, job_id: str, name: str, log: Any) -> Any:
    """Stream the job's logs, then wait for it to end; returns its terminal status."""
    from ray.job_submission import JobStatus

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
    except Exception as e:  # noqa: BLE001 - the log stream may drop; the status below decides
        log(f"{name}: log stream ended ({e}); waiting for the job")
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while (status := client.get_job_status(job_id)) not in terminal:
        time.sleep(JOB_POLL_S)
    return status


class _Terminated(KeyboardInterrupt):
    """SIGTERM while waiting for a job: handled like Ctrl-C (the job is stopped), then exits 143."""


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """While waiting on a job, SIGTERM interrupts like Ctrl-C (SIGINT already raises KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum: int, frame: Any) -> None:
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_job(client: Any, job_id: str, name: str, address: str) -> None:
    """Stop the job the user interrupted, wait up to JOB_STOP_WAIT_S for it to end, and say so on stderr.
    A second Ctrl-C meanwhile gives up waiting (the job may still run: the message says how to stop it)."""
    from ray.job_submission import JobStatus

    how = f"`ray job stop {job_id} --address {address}`"
    print(f"{name}: interrupted; stopping Ray job {job_id} on {address}", file=sys.stderr, flush=True)
    status = None
    try:
        client.stop_job(job_id)
        deadline = time.monotonic() + JOB_STOP_WAIT_S
        while (status := client.get_job_status(job_id)) not in (JobStatus.STOPPED, JobStatus.SUCCEEDED,
                                                                 JobStatus.FAILED) and time.monotonic() < deadline:
            time.sleep(0.5)
    except KeyboardInterrupt:
        print(f"{name}: stopped waiting; Ray job {job_id} was asked to stop; check with {how}", file=sys.stderr, flush=True)
        return
    except Exception as e:  # noqa: BLE001 - the user's interrupt stands; say what is left running
        print(f"{name}: could not stop Ray job {job_id} ({e}); stop it with {how}", file=sys.stderr, flush=True)
        return
    if status == JobStatus.STOPPED:
        print(f"{name}: Ray job {job_id} stopped", file=sys.stderr, flush=True)
    elif status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        print(f"{name}: Ray job {job_id} had already ended {status}", file=sys.stderr, flush=True)
    else:
        print(f"{name}: Ray job {job_id} is still {status} after {JOB_STOP_WAIT_S:.0f} s; stop it with {how}",
              file=sys.stderr, flush=True)


# A lost actor or node costs only the shards it was writing: Ray Data's actor pool replaces a dead
# actor (on another node when its own is gone) and retries its shards there, without bound (a bound
# is spent in seconds while a lost node is not yet declared dead: every retry fails at once). Up to
# ACTOR_INIT_DEATHS actors in a row may also die while loading the model (Ray's default: none).
ACTOR_INIT_DEATHS = 3


def actor_pool(num_actors: int | None, actor_num_cpus: float | None, use_gpu: bool | None, work: int) -> tuple[int, float, bool]:
    """(actors, CPUs each, whether each holds a GPU) for an actor pool over ``work`` blocks: by
    default one actor per GPU when the cluster has GPUs (a whole GPU each), else one per CPU, the
    cores split evenly less a quarter core each for Ray Data's own tasks (and an actor fits on one
    node: a pool that asks for whole cores on a small machine starves those tasks and hangs)."""
    import ray

    resources = ray.cluster_resources()
    gpu = use_gpu if use_gpu is not None else resources.get("GPU", 0) > 0
    actors = max(1, min(num_actors or int(resources.get("GPU", 0) if gpu else resources.get("CPU", 1)), work))
    node_cpus = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)
    cpus = 1.0 if gpu else max(0.25, min(float(resources.get("CPU", 1)) / actors, node_cpus) - 0.25)
    if actor_num_cpus is not None and not gpu:
        cpus = float(actor_num_cpus)
    return actors, cpus, gpu


def map_with_actor_pool(ds: Any, actor: type, constructor_args: tuple, work: int, batch_size: int | None,
                        num_actors: int | None = None, actor_num_cpus: float | None = None, use_gpu: bool | None = None,
                        progress: bool = False, init_deaths: int | None = None) -> Any:
    """``ds.map_batches`` with a pool of ``actor`` (a callable class, built with ``constructor_args``
    on each actor), sized by ``actor_pool`` for ``work`` blocks; numpy batches of ``batch_size``
    rows (None: whole blocks); the actors get the S3 variables. ``init_deaths``: how many actors in
    a row may die while loading (None: Ray's default)."""
    import ray

    actors, cpus, gpu = actor_pool(num_actors, actor_num_cpus, use_gpu, work)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    if init_deaths is not None:
        context.max_consecutive_actor_init_deaths = init_deaths
    return ds.map_batches(
        actor,
        batch_size=batch_size,
        fn_constructor_args=constructor_args,
        batch_format="numpy",
        concurrency=actors,
        num_gpus=1 if gpu else 0,
        num_cpus=cpus,
        runtime_env={"env_vars": storage.aws_env()},
    )
