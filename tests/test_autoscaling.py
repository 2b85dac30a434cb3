"""Autoscaling on one machine: Ray's fake multi-node provider driven by
cluster/local/fake-autoscaling.yaml. The head offers no CPUs, so a `ray job submit` of
ray_jobs/train.py with two workers can only run on nodes the autoscaler launches; once the
job is over they sit idle and the autoscaler removes them after idle_timeout_minutes.

The "nodes" are extra raylets that Ray's monitor starts on this machine, exactly where a
cloud provider would start instances, so what is checked is the autoscaler's own logic:
demand -> launch, idle -> terminate.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")

from conftest import REPO, TINY, _free_port  # noqa: E402

pytestmark = pytest.mark.timeout(300)

CONFIG = REPO / "cluster" / "local" / "fake-autoscaling.yaml"
HEAD_NODE_ID = "f" * 51 + "00000"  # the fake provider's fixed id for the head


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


class FakeCluster:
    """A `ray start --head --block` with the fake provider's autoscaler, on ports and in a
    temp folder of its own, stopped with its whole process group (the fake worker raylets
    are children of its monitor)."""

    def __init__(self, workdir: Path) -> None:
        self.port, dashboard = _free_port(), _free_port()
        self.address = f"http://127.0.0.1:{dashboard}"
        config = yaml.safe_load(CONFIG.read_text())
        # The YAML names Ray's default GCS port; this head listens on its own.
        config["provider"]["gcs_address"] = f"127.0.0.1:{self.port}"
        self.config = config
        config_path = workdir / "autoscaling.yaml"
        config_path.write_text(yaml.safe_dump(config))
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "disabled",
            "RAY_FAKE_CLUSTER": "1",
            # The autoscaler's loop every second instead of every 5 s.
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.ray_tmp = tempfile.mkdtemp(prefix="fk", dir="/tmp")  # short: Ray puts sockets here
        self.log_path = workdir / "head.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [
                _bin("ray"), "start", "--head", "--block", f"--port={self.port}", "--num-cpus=0",
                f"--autoscaling-config={config_path}", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}", "--include-dashboard=true",
                f"--object-store-memory={200 * 1024**2}", "--disable-usage-stats", f"--temp-dir={self.ray_tmp}",
                f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
                f"--ray-client-server-port={_free_port()}",
            ],
            env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        # Up once the state API lists the head (the dashboard answers a little before).
        deadline = time.monotonic() + 120
        while True:
            try:
                if any(n["state"] == "ALIVE" for n in self.nodes()):
                    return
            except (OSError, KeyError, ValueError):  # not answering, or not ready to
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the Ray head did not start: {self.log_path.read_text()[-2000:]}")
            time.sleep(1)

    def nodes(self) -> list[dict]:
        """Every node the GCS knows, alive or dead (state API)."""
        found = _get(f"{self.address}/api/v0/nodes?limit=1000&detail=true")
        return found["data"]["result"]["result"]

    def alive_workers(self) -> list[dict]:
        return [n for n in self.nodes() if n["state"] == "ALIVE" and n["node_id"] != HEAD_NODE_ID]

    def monitor_log(self) -> str:
        logs = Path(self.ray_tmp) / "session_latest" / "logs"
        return "".join(p.read_text(errors="replace") for p in logs.glob("monitor*.log"))

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            pass
        # `ray start --block` can outlive SIGTERM while its children shut down: the group is
        # this cluster's alone (its own session), so end what is left of it.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._log.close()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


@pytest.fixture
def fake_cluster(tmp_path):
    cluster = FakeCluster(tmp_path)
    yield cluster
    cluster.stop()


def _submit(cluster: FakeCluster, submission_id: str, *args: str) -> None:
    command = [
        _bin("ray"), "job", "submit", "--address", cluster.address, "--working-dir", str(REPO),
        "--submission-id", submission_id, "--no-wait", "--", "python", "ray_jobs/train.py", *args,
    ]
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run(command, env=cluster.env, capture_output=True, text=True, timeout=300)
        if done.returncode == 0:
            return
        # The head answers HTTP a little before its job agent is up.
        if "No available agent" not in done.stderr or time.monotonic() > deadline:
            raise AssertionError(done.stdout[-3000:] + done.stderr[-3000:])
        time.sleep(2)


def test_training_job_brings_up_worker_nodes_and_idle_ones_go_away(fake_cluster, synth_data, tmp_path):
    cluster = fake_cluster
    worker_type = cluster.config["available_node_types"]["cpu_worker"]
    idle_timeout_s = cluster.config["idle_timeout_minutes"] * 60

    # Only the head, and it offers no CPUs: the job cannot run without new nodes.
    (head,) = [n for n in cluster.nodes() if n["state"] == "ALIVE"]
    assert head["node_id"] == HEAD_NODE_ID and head["resources_total"].get("CPU", 0) == 0

    storage = tmp_path / "runs"
    submission_id = f"autoscale-{uuid.uuid4().hex[:8]}"
    t_submit = time.monotonic()
    _submit(
        cluster, submission_id,
        "--config", "configs/synth_R18_uniinst.yaml", "--workers", "2", "--storage-path", str(storage),
        "--name", "fake", *TINY,
        "ray.cpus_per_worker=1", "solver.max_iter=3", "data.batch_size=1", "data.synthetic=false",
        f"data.train.json={synth_data / 'annotations' / 'instances_train.json'}",
        f"data.train.images={synth_data / 'train'}",
    )

    # While the job runs: watch the nodes until it is over.
    most_workers, t_up, status = [], None, "PENDING"
    while status not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() - t_submit < 200, f"job still {status}: {cluster.monitor_log()[-3000:]}"
        workers = cluster.alive_workers()
        if len(workers) > len(most_workers):
            most_workers = workers
        if t_up is None and len(workers) >= 2:
            t_up = time.monotonic()
        status = _get(f"{cluster.address}/api/jobs/{submission_id}")["status"]
        time.sleep(1)
    t_end = time.monotonic()
    job = _get(f"{cluster.address}/api/jobs/{submission_id}")
    assert status == "SUCCEEDED", job.get("message")
    summary = json.loads((storage / "fake" / "summary.json").read_text())
    assert summary["iteration"] == 3 and summary["workers"] == 2

    # Two workers of one CPU each: two nodes of the YAML's worker type came up for them.
    assert len(most_workers) == 2, most_workers
    for node in most_workers:
        assert node["resources_total"]["CPU"] == worker_type["resources"]["CPU"]

    # Afterwards nothing is scheduled on them: the autoscaler terminates them once idle.
    t_gone = None
    while t_gone is None:
        if not cluster.alive_workers():
            t_gone = time.monotonic()
        else:
            assert time.monotonic() - t_end < idle_timeout_s + 60, "idle worker nodes were not removed"
            time.sleep(1)
    launched = {w["node_id"] for w in most_workers}
    for node in cluster.nodes():
        if node["node_id"] in launched:
            assert node["state"] == "DEAD" and (node["state_message"] or "").startswith("Expected termination"), node
    # ... and it was the autoscaler that terminated them, for being idle.
    log = cluster.monitor_log().splitlines()
    idle_terminations = [line for line in log if "Terminating the node with id" in line and "(idle)" in line]
    assert {node_id for node_id in launched if any(node_id in line for line in idle_terminations)} == launched
    print(
        f"\nfake cluster: submit -> 2 workers up {t_up - t_submit:.0f} s, job done {t_end - t_submit:.0f} s, "
        f"job end -> workers removed {t_gone - t_end:.0f} s (idle_timeout {idle_timeout_s:.0f} s)"
    )
