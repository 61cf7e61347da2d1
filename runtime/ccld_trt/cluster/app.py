"""Ray and Ray Serve: start a local Ray on 127.0.0.1 (or join one), deploy the replicas, serve HTTP.

HTTP enters through one ``Ingress`` replica (keys, the per-client limit, the access log: see ingress.py), which
forwards to the model replicas. Each is a Serve replica holding one ``Replica`` (the models, loaded once, and its
step batcher); on CUDA it holds one GPU (``num_gpus=1``). Serve replaces a replica that dies and routes around it
meanwhile; requests beyond ``max_queued_requests`` waiting at the ingress get 503. A small named actor collects
every replica's counters so that /v1/stats answers for the whole deployment, whichever replica serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ccld_trt.access import AccessPolicy, KeyFileWatcher, check_exposure
from ccld_trt.cluster import ingress
from ccld_trt.cluster.local_ray import (
    FORWARDED_ENV,
    LocalRay,
    bind_serve_grpc_to_loopback,
    check_auth_mode,
    forget_env_key,
)
from ccld_trt.cluster.replica import Replica, ReplicaSettings, combine_stats
from ccld_trt.export.errors import UserError
from ccld_trt.runner import BackendOptions, ModelSource
from ccld_trt.stopping import LAST_RESORT_S, StopSignals, bounded

APP_NAME = "ccld-trt"
NAMESPACE = "ccld-trt"
STATS_ACTOR = "ccld-trt-stats"
ACCESS_ACTOR = "ccld-trt-access"  # holds the access policy (digests only) that the ingress follows
DEFAULT_PORT = 8000
KEY_POLL_S = 5.0  # how often a running cluster looks at its key file
# After SIGINT or SIGTERM, the clean-up (Serve, then Ray's processes) gets this long: gone within 15 s of the signal
SHUTDOWN_S = 10.0
# Serve checks each model replica this often (and the replica reports its stats then). Serve learns of a replica's
# death at its next check, so this bounds how long a crashed one goes unreplaced (2 s added up to 2 s to a restart).
HEALTH_PERIOD_S = 0.5
REPLICA_STALE_S = 10.0  # a replica silent this long (20 checks) is dead to /v1/stats and /v1/health
INSTALL_HINT = "pip install 'ccld-trt[cluster]' (Ray Serve)"
_local_ray: LocalRay | None = None  # the local Ray start_ray started (shutdown stops it and removes its files)


def _ray() -> Any:
    try:
        import ray
        from ray import serve  # noqa: F401  (checked here so that a partial install fails in one line)
    except ImportError as e:
        raise UserError(f"the cluster needs Ray Serve: {INSTALL_HINT} ({e})") from None
    return ray


@dataclass(frozen=True)
class ClusterSpec:
    """What to deploy: ``replicas`` copies of the models, each batching as ``settings`` says; ``max_queue``
    requests may wait for a replica before the ingress answers 503 (-1: no limit); who may use it: ``access``
    (default: anyone who reaches it, no per-client limit)."""

    replicas: int = 1
    max_queue: int = 64
    settings: ReplicaSettings = field(default_factory=ReplicaSettings)
    access: AccessPolicy = field(default_factory=AccessPolicy)

    def validate(self) -> ClusterSpec:
        if self.replicas < 1:
            raise UserError(f"replicas must be >= 1, got {self.replicas}")
        if self.max_queue < 1 and self.max_queue != -1:
            raise UserError(f"max_queue must be >= 1 (or -1 for no limit), got {self.max_queue}")
        self.settings.validate()
        self.access.validate()
        return self


def replica_resources(device: str) -> dict[str, float]:
    """Ray resources of one replica: a whole GPU on CUDA (Ray sets CUDA_VISIBLE_DEVICES to it), one CPU else."""
    if device.startswith("cuda"):
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_cpus": 1}


def deployment_options(device: str, spec: ClusterSpec) -> dict[str, Any]:
    """Serve deployment options for ``spec`` on ``device``: replicas, their resources, how many requests each
    runs at once, the proxy queue limit, and the batching settings as a user_config (changeable in place)."""
    return {"num_replicas": spec.replicas, "ray_actor_options": replica_resources(device),
            "max_ongoing_requests": spec.settings.max_ongoing, "max_queued_requests": spec.max_queue,
            "user_config": {"batching": spec.settings.batching, "max_batch": spec.settings.max_batch},
            "health_check_period_s": HEALTH_PERIOD_S, "health_check_timeout_s": 30.0,
            "graceful_shutdown_timeout_s": 5.0}


def ingress_options() -> dict[str, Any]:
    """Serve options of the ingress: one replica (it must see every request to count each client's), no CPU
    reserved (it only forwards). Its access policy comes from the ACCESS_ACTOR: a Serve redeploy (even of a
    user_config alone, through ``serve.run``) would restart every replica, models included."""
    return {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": ingress.MAX_ONGOING,
            "graceful_shutdown_timeout_s": 5.0}


class StatsBoard:
    """A Ray actor holding named values with when each was last put (its own clock: no skew between nodes):
    the access policy, and each replica's latest stats, which ``get(max_age)`` leaves out once they are older
    (a replica reports at least every health check, ``HEALTH_PERIOD_S``: a dead one drops out)."""

    def __init__(self) -> None:
        self.stats: dict[str, dict[str, Any]] = {}
        self.stamps: dict[str, float] = {}

    def put(self, replica: str, stats: dict[str, Any]) -> None:
        self.stats[replica] = stats
        self.stamps[replica] = time.monotonic()

    def get(self, max_age: float | None = None) -> dict[str, dict[str, Any]]:
        if max_age is None:
            return self.stats
        now = time.monotonic()
        return {name: value for name, value in self.stats.items() if now - self.stamps[name] <= max_age}


class ClusterIngress(ingress.Ingress):
    """The ingress deployment's class: ``ingress.Ingress`` in a Serve replica kept on loopback."""

    def __init__(self, *args: Any) -> None:
        bind_serve_grpc_to_loopback()
        super().__init__(*args)


class ClusterReplica:
    """The model deployment's class (decorated in ``application``): requests from the ingress, ``Replica`` work
    on threads."""

    def __init__(self, options: BackendOptions, models: ModelSource, settings: ReplicaSettings) -> None:
        ray = _ray()
        from ray import serve

        bind_serve_grpc_to_loopback()
        self.replica = Replica(options, models, settings)
        self.pool = ThreadPoolExecutor(max_workers=settings.max_ongoing + 2, thread_name_prefix="ccld-trt-req")
        self.name = f"{serve.get_replica_context().replica_id.unique_id} (pid {os.getpid()})"
        self.board = ray.get_actor(STATS_ACTOR, namespace=NAMESPACE)
        self.board.put.remote(self.name, self.replica.stats())  # ready: the ingress's /v1/health counts it

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.replica.configure(batching=config.get("batching"), max_batch=config.get("max_batch"))

    def check_health(self) -> None:
        if not self.replica.healthy():
            raise RuntimeError("the step batcher stopped")
        self.board.put.remote(self.name, self.replica.stats())  # the heartbeat that keeps it in stats and health

    async def run_request(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """One admitted HTTP request -> (status, JSON body); /v1/stats answers for every replica."""
        loop = asyncio.get_running_loop()
        status, payload = await loop.run_in_executor(self.pool, self.replica.handle, method, path, body)
        self.board.put.remote(self.name, self.replica.stats())
        if path.rstrip("/") == "/v1/stats" and status == 200:
            board = await self.board.get.remote(REPLICA_STALE_S)
            payload = {**combine_stats(board), "this_replica": payload}
        return status, payload


def application(options: BackendOptions, models: ModelSource, spec: ClusterSpec) -> Any:
    """The bound Serve application of ``spec`` (to ``serve.run``): the ingress in front of the model replicas."""
    _ray()
    from ray import serve

    deployment = serve.deployment(name="generate", **deployment_options(options.device, spec))(ClusterReplica)
    front = serve.deployment(name="ingress", **ingress_options())(ClusterIngress)
    return front.bind(deployment.bind(options, models, spec.settings), (ACCESS_ACTOR, NAMESPACE),
                      (STATS_ACTOR, NAMESPACE, REPLICA_STALE_S))


def start_ray(address: str | None = None, temp_dir: str | None = None, num_cpus: int | None = None,
              insecure: bool = False, trusted: Sequence[str] = (), keep_logs: bool = False) -> None:
    """Join the Ray cluster at ``address`` (what it exposes is its operator's choice: docs/security.md), or
    start a private local one (local_ray.LocalRay: every port on loopback, token auth, its files under a
    0700 ``temp_dir``, removed at ``shutdown`` unless ``keep_logs``). The API key leaves this process's
    environment first (Ray's processes would copy it). ``trusted``: the --trusted-proxy addresses whose
    X-Forwarded-For Serve's proxy believes (none by default)."""
    global _local_ray
    ray = _ray()
    if ray.is_initialized():
        return
    forget_env_key()
    quiet = {"log_to_driver": False, "configure_logging": False}
    if address:
        check_auth_mode(os.environ, insecure)
        ray.init(address=address, namespace=NAMESPACE,
                 runtime_env={"env_vars": {FORWARDED_ENV: ",".join(trusted)}}, **quiet)
        return
    local = LocalRay(temp_dir, keep_logs=keep_logs, trusted=trusted)
    try:
        local.start(num_cpus, NAMESPACE, insecure=insecure)
    except BaseException:
        with contextlib.suppress(Exception):
            ray.shutdown()
        local.close()
        raise
    _local_ray = local


@dataclass(frozen=True)
class Deployed:
    """A running deployment: its URL, and what it was deployed with (paths made absolute)."""

    url: str
    options: BackendOptions
    models: ModelSource
    spec: ClusterSpec


def deploy(options: BackendOptions, models: ModelSource, spec: ClusterSpec, host: str = "127.0.0.1",
           port: int = DEFAULT_PORT) -> Deployed:
    """Deploy ``spec`` on the Ray this process is connected to (``start_ray``); returns once every replica has
    loaded its models."""
    ray = _ray()
    from ray import serve

    spec.validate()
    options, models = prepare_models(options.resolved(), models)
    # detached: a named actor whose handle goes out of scope would die; shutdown() removes it
    ray.remote(StatsBoard).options(name=STATS_ACTOR, namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
                                   num_cpus=0).remote()
    access = ray.remote(StatsBoard).options(name=ACCESS_ACTOR, namespace=NAMESPACE, get_if_exists=True,
                                            lifetime="detached", num_cpus=0).remote()
    ray.get(access.put.remote("policy", spec.access.config()))  # before the ingress can answer anything
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(options, models, spec), name=APP_NAME, route_prefix="/")
    return Deployed(f"http://{host}:{port}", options, models, spec)


def reconfigure(deployed: Deployed, settings: ReplicaSettings) -> Deployed:
    """Apply new batching settings (the user_config: batching, max_batch) by redeploying. Note that ``serve.run``
    gives every deployment a new random code version, so Serve replaces the replicas and they load their models
    again (seen in tests/test_access_cluster.py's replica names); access changes use ``update_access`` instead."""
    from ray import serve

    spec = dataclasses.replace(deployed.spec, settings=settings.validate())
    serve.run(application(deployed.options, deployed.models, spec), name=APP_NAME, route_prefix="/")
    return dataclasses.replace(deployed, spec=spec)


def update_access(deployed: Deployed, access: AccessPolicy) -> Deployed:
    """New keys or limits for the running cluster: the ingress takes them within ``ingress.POLICY_POLL_S``,
    in place (no replica restarts; requests in flight and counts are kept)."""
    ray = _ray()
    spec = dataclasses.replace(deployed.spec, access=access.validate())
    ray.get(ray.get_actor(ACCESS_ACTOR, namespace=NAMESPACE).put.remote("policy", access.config()))
    return dataclasses.replace(deployed, spec=spec)


def prepare_models(options: BackendOptions, models: ModelSource) -> tuple[BackendOptions, ModelSource]:
    """The options and model files with absolute paths (replicas may start in another directory), after
    exporting the onnxruntime graphs once here, before replicas on this machine would race to export them."""
    from ccld_trt.export.onnx_export import default_onnx_dir

    files = models.files
    cloob_config = Path(files.cloob_config)
    files = dataclasses.replace(files, unet=files.unet.resolve(), autoencoder=files.autoencoder.resolve(),
                                autoencoder_config=files.autoencoder_config.resolve(), cloob=files.cloob.resolve(),
                                cloob_config=str(cloob_config.resolve()) if cloob_config.is_file()
                                else files.cloob_config)
    models = dataclasses.replace(models, files=files)
    options = dataclasses.replace(options, engine_dir=options.engine_dir.absolute())
    if options.backend != "onnxruntime":
        return options, models
    from ccld_trt.export.graph_specs import BACKEND_GRAPHS
    from ccld_trt.export.onnx_export import export_all

    onnx_dir = (options.onnx_dir or default_onnx_dir(files)).absolute()
    # the precision open_session picks when none is given: fp16 on CUDA
    fp16 = (options.precision or ("fp16" if options.device.startswith("cuda") else "fp32")) == "fp16"
    export_all(files, onnx_dir, (*BACKEND_GRAPHS, "unet"), fp16=fp16, progress=False)
    return dataclasses.replace(options, onnx_dir=onnx_dir), models


def shutdown(budget_s: float = SHUTDOWN_S) -> None:
    """Remove what ``deploy`` made and disconnect, each step bounded (stopping.bounded) within ``budget_s`` in
    all: a local Ray started by ``start_ray`` stops with Serve (freeing its processes and ports; Serve's graceful
    stop gets a share of the budget, then Ray's processes are stopped whatever it finished); on a joined cluster
    only this application and its two actors go."""
    global _local_ray
    ray = _ray()
    from ray import serve

    if not ray.is_initialized():
        return
    deadline = time.monotonic() + budget_s

    def remove_ours() -> None:
        if _local_ray:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
            for name in (STATS_ACTOR, ACCESS_ACTOR):
                with contextlib.suppress(ValueError):
                    ray.kill(ray.get_actor(name, namespace=NAMESPACE))

    try:
        bounded(remove_ours, budget_s / 2, "ccld-trt cluster: stopping Serve")
    finally:
        local, _local_ray = _local_ray, None
        bounded(ray.shutdown, max(1.0, deadline - time.monotonic()), "ccld-trt cluster: stopping Ray")
        if local is not None:  # after Ray's processes are gone: its token, and its files unless kept
            local.close()


def run_cluster(options: BackendOptions, models: ModelSource, spec: ClusterSpec, address: str | None,
                host: str, port: int, say: Callable[[str], None] = print, listen: bool = False,
                insecure: bool = False, key_file: str | Path | None = None, trusted: Sequence[str] = (),
                keep_ray_logs: bool = False) -> str:
    """``ccld-trt cluster``: check the host rule (access.check_exposure), start or join Ray, deploy, say the URL,
    serve until SIGINT or SIGTERM (taking ``key_file``'s keys again whenever it changes), then clean up within
    SHUTDOWN_S, whatever signal dispositions the process inherited (stopping.StopSignals; a signal during the
    start abandons it). Returns the name of the signal that stopped it. Call it from the main thread."""
    warning = check_exposure(host, listen, spec.access.keys, insecure)
    if warning:
        say(warning)
    options = options.resolved()
    spec.validate()
    models.files.check_present()  # before Ray starts: a missing file is one line, nothing started
    start = time.perf_counter()
    # The handlers before Ray starts its processes: they then get SIGINT at its default, not an inherited "ignore".
    with StopSignals("ccld-trt cluster", exit_within=LAST_RESORT_S) as stop:
        try:
            with stop.interrupting():
                start_ray(address, num_cpus=max(os.cpu_count() or 1, spec.replicas) if not address else None,
                          insecure=insecure, trusted=trusted, keep_logs=keep_ray_logs)
        except KeyboardInterrupt:
            if not stop.requested:
                raise
            return stop.signal_name or "a stop request"  # start_ray cleaned up what it had started
        stop.reclaim()  # from Ray's driver, which took SIGTERM
        try:
            with stop.interrupting():
                deployed = deploy(options, models, spec, host, port)
            serve_until_stopped(deployed, stop, say, start, key_file)
        except KeyboardInterrupt:
            if not stop.requested:
                raise
        finally:
            shutdown()
        say("ccld-trt cluster: stopped")
        return stop.signal_name or "a stop request"


def serve_until_stopped(deployed: Deployed, stop: StopSignals, say: Callable[[str], None], start: float,
                        key_file: str | Path | None) -> None:
    """Say the URL and the access settings, then wait for ``stop``, taking ``key_file``'s keys again whenever
    it changes."""
    url, spec = deployed.url, deployed.spec
    say(f"ccld-trt cluster: {spec.replicas} replica(s) of {deployed.options.describe()} ready in "
        f"{time.perf_counter() - start:.1f} s at {url}/v1/generate (stats: {url}/v1/stats)")
    access = spec.access
    say(f"ccld-trt cluster: {len(access.keys.ids) or 'no'} key(s) {' '.join(access.keys.ids)}; at most "
        f"{access.max_in_flight or 'unlimited'} request(s) in flight per client; access log: the ingress "
        f"replica's file under {_serve_logs()}" + (" (with prompts)" if access.log_prompts else ""))
    watcher = KeyFileWatcher(key_file) if key_file else None
    while not stop.wait(KEY_POLL_S if watcher else None):
        try:
            keys = watcher.poll() if watcher else None
        except UserError as e:
            say(f"ccld-trt cluster: the key file changed but cannot be used, the previous keys stay: {e}")
            continue
        if keys is not None:
            deployed = update_access(deployed, dataclasses.replace(deployed.spec.access, keys=keys))
            say(f"ccld-trt cluster: keys reloaded: {' '.join(keys.ids)}")


def _serve_logs() -> str:
    """Where Serve writes this machine's replica logs (and whether they outlive the cluster)."""
    ray = _ray()
    try:
        session = ray._private.worker._global_node.get_session_dir_path()  # no public API names it
    except AttributeError:
        return "<ray session dir>/logs/serve"
    if _local_ray is None:
        return f"{session}/logs/serve"
    kept = "kept at exit" if _local_ray.keep_logs else "removed at exit unless --keep-ray-logs"
    return f"{session}/logs/serve (private, {kept})"


def settings_dict(spec: ClusterSpec) -> dict[str, Any]:
    """The spec as plain data (for reports)."""
    return {"replicas": spec.replicas, "max_queue": spec.max_queue, **asdict(spec.settings)}
