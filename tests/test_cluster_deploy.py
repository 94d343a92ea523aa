"""``agenthub up --address`` and ``agenthub down`` against a Ray cluster of their own (``ray start --head``).

The cluster runs beside the test session's Ray, so it gets its own ports, token and Serve in its default mode (the
Python proxy: HAProxy's fixed ports are the session's). The CLI runs as it does from a shell, in subprocesses."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from actors.tools.test_runner import as_child
from storage.embedded import EmbeddedPostgres
from tests.conftest import free_port

BIN = Path(sys.executable).parent
TOKEN = "deploy-token"
LIST_ACTORS = (
    "import json, sys, ray; ray.init(address=sys.argv[1], log_to_driver=False); "
    "print(json.dumps(ray.util.list_named_actors(all_namespaces=True)))"
)


def bare_env() -> dict[str, str]:
    """This process's environment without Ray's, agenthub's and ``DATABASE_URL``: a command sees only what the test
    gives it, not the settings of the run around it."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AGENTHUB_")) and k != "DATABASE_URL"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """A one-node Ray cluster; its address and the environment a client of it needs."""
    tmp_path = tmp_path_factory.mktemp("deploy")
    address = f"127.0.0.1:{free_port()}"
    env = bare_env()
    env |= {
        "RAY_AUTH_MODE": "token",  # Ray 2.60 clusters may require it; an explicit address never picks it up itself
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0",
        "RAY_SERVE_ENABLE_HA_PROXY": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "1",  # at the end, stop at once: nothing is left to drain
        "AGENTHUB_DATA_DIR": str(tmp_path / "data"),
        "AGENTHUB_PG_PORT": str(free_port()),
        "AGENTHUB_API_TOKEN": TOKEN,
    }
    ports = {
        "port": address.split(":")[1],
        "ray-client-server-port": free_port(),
        "dashboard-agent-listen-port": free_port(),
        "dashboard-agent-grpc-port": free_port(),
    }
    options = [f"--{k}={v}" for k, v in ports.items()]
    options += ["--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"]
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", *options],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert head.stdout is not None
        for line in head.stdout:  # it prints this once its processes are up, then blocks
            if "Ray runtime started" in line:
                break
        else:
            pytest.fail("ray start --head exited before the cluster was up")
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # ray start --block stops the node's processes on SIGTERM
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(10)
        # `ray start` leaves its address here for `ray.init()` and the `ray` CLI to find; `ray stop` would remove it
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and current.read_text().strip().endswith(f":{ports['port']}"):
            current.unlink()


def cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([str(BIN / "agenthub"), *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return " ".join(done.stdout.split())  # rich wraps long lines


def our_actors(env: dict[str, str], address: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", LIST_ACTORS, address], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return {a["name"] for a in json.loads(out.stdout.splitlines()[-1]) if a["namespace"] == "agenthub"}


def message(api: str, agent_id: str, text: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"text": text, "chat_id": "deploy"}
    return httpx.post(f"{api}/api/v1/agents/{agent_id}/messages", json=body, headers=headers, timeout=60)


def test_up_on_a_cluster_returns_and_down_stops_it_keeping_the_log(cluster: tuple[str, dict[str, str]]) -> None:
    address, env = cluster
    port = free_port()
    api = f"http://127.0.0.1:{port}"

    started = time.monotonic()
    out = cli(env, "up", "--address", address, "--port", str(port))
    assert f"agenthub down --address {address}" in out  # it returned: the deployment runs in the cluster
    assert time.monotonic() - started < 300
    headers = {"Authorization": f"Bearer {TOKEN}"}
    agent_id = httpx.post(f"{api}/api/v1/agents", json={"name": "d"}, headers=headers, timeout=60).json()["id"]
    assert httpx.post(f"{api}/api/v1/agents/{agent_id}/start", headers=headers, timeout=60).status_code == 200
    first = message(api, agent_id, "one")
    assert first.status_code == 200 and "turn 1" in first.json()["response"]
    assert {"orchestrator", "projector", "llm", f"agent:{agent_id}"} <= our_actors(env, address)

    out = cli(env, "down", "--address", address)
    assert "stopped serve app agenthub" in out and "stopped actor agenthub/orchestrator" in out
    # drained first (the chat was answered: nothing left in flight), then stopped
    assert "orchestrator drained, checkpoints saved stopped actor agenthub/orchestrator" in out
    assert f"stopped actor agenthub/agent:{agent_id}" in out and "stopped embedded postgres" in out
    assert our_actors(env, address) == set()
    with pytest.raises(httpx.TransportError):  # no other Serve app was left, so Serve let go of the port too
        httpx.get(f"{api}/healthz", timeout=5)

    # The log was kept: a new deployment finds the running agent and the chat's history in it.
    cli(env, "up", "--address", address, "--port", str(port))
    second = message(api, agent_id, "two")
    assert second.status_code == 200 and "turn 2" in second.json()["response"], second.text
    assert "nothing of agenthub was running" not in cli(env, "down", "--address", address)
    assert cli(env, "down", "--address", address).endswith("nothing of agenthub was running")


DRAIN = (
    "import sys, ray; ray.init(address=sys.argv[1], log_to_driver=False); "
    "o = ray.get_actor('orchestrator', namespace='agenthub'); ray.get(o.drain.remote(1)); "
    "print(ray.get(o.status.remote())['router'])"
)
UP_THEN_DOWN = (
    "from cluster.bootstrap import down, up; from cluster.settings import get_settings; print(down(up(get_settings())))"
)


def test_the_address_in_the_environment_deploys_and_a_drained_orchestrator_routes_again(
    cluster: tuple[str, dict[str, str]],
) -> None:
    """AGENTHUB_RAY_ADDRESS is ``--address``: `up` deployed, then ran in local mode and, stopped, tore the cluster's
    deployment down, leaving its orchestrator drained but alive; found by the next `up`, it took every message and
    routed none. Now `up` has a drained orchestrator restarted, and bringing it up and down in a cluster leaves the
    deployment running."""
    address, env = cluster
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    env = env | {"AGENTHUB_RAY_ADDRESS": address, "AGENTHUB_HTTP_PORT": str(port)}

    assert f"stop it with: agenthub down --address {address}" in cli(env, "up")  # it returned: cluster mode
    headers = {"Authorization": f"Bearer {TOKEN}"}
    agent_id = httpx.post(f"{api}/api/v1/agents", json={"name": "d"}, headers=headers, timeout=60).json()["id"]
    assert httpx.post(f"{api}/api/v1/agents/{agent_id}/start", headers=headers, timeout=60).status_code == 200
    assert "turn 1" in message(api, agent_id, "one").json()["response"]

    drained = subprocess.run(
        [sys.executable, "-c", DRAIN, address], env=env, capture_output=True, text=True, timeout=120
    )
    assert drained.returncode == 0 and drained.stdout.split()[-1] == "cancelled", drained.stderr[-3000:]
    unrouted = httpx.post(
        f"{api}/api/v1/agents/{agent_id}/messages",
        params={"timeout": 1},
        json={"text": "two", "chat_id": "deploy"},
        headers=headers,
        timeout=60,
    )
    assert unrouted.status_code == 202

    done = subprocess.run([sys.executable, "-c", UP_THEN_DOWN], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"agenthub runs on in the Ray cluster at {address}" in " ".join(done.stdout.split())
    third = message(api, agent_id, "three")  # after "two", routed at last
    assert third.status_code == 200 and "turn 3" in third.json()["response"], third.text

    out = cli(env, "down")  # the address from the environment, not `auto`
    assert "stopped actor agenthub/orchestrator" in out and "stopped embedded postgres" in out
    assert our_actors(env, address) == set()


LOCAL_GCS = (
    "import ray; from cluster.bootstrap import start_ray; from cluster.settings import Settings; "
    "start_ray(Settings(num_cpus=1)); print('GCS', ray.get_runtime_context().gcs_address); ray.shutdown()"
)


def test_a_local_up_starts_its_own_ray_beside_a_ray_start_cluster(cluster: tuple[str, dict[str, str]]) -> None:
    """``ray.init()`` joins the cluster a ``ray start`` left its address for (and refuses our ``num_cpus``)."""
    address, env = cluster
    local = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    done = subprocess.run([sys.executable, "-c", LOCAL_GCS], env=local, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    gcs = next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("GCS "))
    assert gcs.rsplit(":", 1)[1] != address.rsplit(":", 1)[1]


@pytest.mark.parametrize("command", ["up", "down", "demo", "team demo"])
def test_an_address_nothing_answers_at_is_a_clear_error_at_once(command: str, tmp_path: Path) -> None:
    """Ray retries such an address for minutes; the CLI says so in a line, and ``up`` starts no Postgres for it.
    The demos take the address from the environment only (they had no clear error: a traceback)."""
    env = bare_env()
    env |= {"AGENTHUB_DATA_DIR": str(tmp_path), "AGENTHUB_PG_PORT": str(free_port())}
    address = f"127.0.0.1:{free_port()}"
    args = command.split()
    if "demo" in args:
        env["AGENTHUB_RAY_ADDRESS"] = address
    else:
        args += ["--address", address]
    started = time.monotonic()
    done = subprocess.run([str(BIN / "agenthub"), *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"no Ray cluster at {address}: nothing answers at {address}" in " ".join(done.stdout.split())
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 30
    assert not (tmp_path / "postgres").exists()


@pytest.mark.parametrize("command", ["up", "demo", "team demo"])
def test_a_taken_http_port_is_a_clear_error_at_once(command: str, tmp_path: Path) -> None:
    """HAProxy that cannot bind the port crashes inside Serve, which retries it while the command waits (an HAProxy
    left by a killed system holds the port so). The CLI says so in a line before it starts anything."""
    env = bare_env()
    env |= {"AGENTHUB_DATA_DIR": str(tmp_path), "AGENTHUB_PG_PORT": str(free_port())}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        args = [str(BIN / "agenthub"), *command.split(), "--port", str(port)]
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"cannot serve HTTP: 127.0.0.1:{port} is in use" in " ".join(done.stdout.split())
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 30
    assert not (tmp_path / "postgres").exists()


@pytest.mark.parametrize("phase", ["database", "ray"])
def test_a_ctrl_c_during_bring_up_stops_what_it_started(phase: str, tmp_path: Path) -> None:
    """``pg_ctl`` detaches the embedded server: `up` interrupted after starting it (while migrating, or starting Ray)
    left it running. Interrupted while starting Ray, it leaves no Ray process behind either."""
    env = bare_env()
    pg = EmbeddedPostgres(tmp_path / "data" / "postgres", free_port())
    pg.start()
    pg.stop()  # initialised beforehand: the interrupt is to come after the server started, not during initdb
    env |= {
        "AGENTHUB_DATA_DIR": str(tmp_path / "data"),
        "AGENTHUB_PG_PORT": str(pg.port),
        "AGENTHUB_HTTP_PORT": str(free_port()),
        "AGENTHUB_DASHBOARD_PORT": str(free_port()),
        "AGENTHUB_API_TOKEN": TOKEN,
    }
    # SIGINT at its default, as a terminal's Ctrl-C finds it: a test run a shell started in the background (a CI job)
    # ignores SIGINT, and its children inherit that, so the interrupt would be lost.
    cmd = as_child([str(BIN / "agenthub"), "up"])
    up = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ray_processes: list[psutil.Process] = []

    def under_way() -> bool:
        if phase == "database":
            return accepts_connections(pg.port)
        try:
            children = psutil.Process(up.pid).children(recursive=True)
            ray_processes[:] = [p for p in children if "gcs_server" in p.name()]
        except psutil.NoSuchProcess:  # one ended meanwhile: look again
            return False
        return bool(ray_processes)

    try:
        deadline = time.monotonic() + 120
        while not under_way():
            assert up.poll() is None and time.monotonic() < deadline, f"up ended before the {phase} started"
            time.sleep(0.05)
        up.send_signal(signal.SIGINT)
        out = up.communicate(timeout=120)[0].decode()
        assert up.returncode != 0 and "agenthub is up" not in out, out[-3000:]  # it was interrupted part-way
        assert not pg.running(), out[-3000:]
        _, alive = psutil.wait_procs(ray_processes, timeout=30)
        assert not alive, out[-3000:]
    finally:
        up.kill()
        pg.stop("immediate")


def accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
