"""``ray job submit`` of the training entrypoint to a head started with ``ray start --head``:
the job succeeds and its checkpoint and evaluation report land in the storage path on S3
(moto's server)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("ray")

from conftest import REPO, TINY_SYNTHETIC, _free_port  # noqa: E402
from uniinst.data.storage import filesystem_for, join  # noqa: E402

pytestmark = pytest.mark.timeout(900)

TINY_JOB = [
    *TINY_SYNTHETIC,
    "data.batch_size=1",
    "solver.max_iter=4",
    "solver.warmup_iters=2",
    "train.checkpoint_period=2",
    "train.log_period=1",
]


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def test_quickstart_runs_the_whole_flow_and_says_where_everything_is(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1"}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "quickstart"
    done = subprocess.run(
        [_bin("uniinst"), "quickstart", "--output-dir", str(out), "--num-images", "2", *TINY_JOB],
        env=env, capture_output=True, text=True, timeout=800, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    scored = re.search(
        r"quickstart done after 4 iterations: val mask AP ([\d.]+) without NMS, ([\d.]+) with mask NMS; "
        r"([\d.]+) duplicates per instance", done.stdout,
    )
    assert scored, done.stdout[-2000:]
    for line in ("checkpoint:", "best model:", "evaluation:", "metrics log:", "predictions:"):
        assert line in done.stdout
    assert (out / "data" / "train" / "manifest.json").is_file()  # the shards
    assert (out / "checkpoint_0000004" / "state.pt").is_file() and (out / "model_best.pt").is_file()
    assert json.loads((out / "summary.json").read_text())["workers"] == 2
    assert len(list((out / "predictions").glob("*.png"))) == 2
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"train/loss", "train/lr", "train/images_per_sec", "train/data_wait_fraction"} <= set(logged[0])
    assert any("val/AP" in row for row in logged) and list((out / "tensorboard").iterdir())
    # Without NMS the final checkpoint scores what the run's own evaluation of it did.
    final_ap = next(row["val/AP"] for row in reversed(logged) if "val/AP" in row)
    assert scored.group(1) == f"{100 * final_ap:.1f}"


@pytest.fixture(scope="module")
def ray_head(aws_test_env, tmp_path_factory):
    """A Ray head of its own (``ray start --head --block``), stopped with its process group."""
    # A distinctive secret (moto accepts any), to look for in the run's files afterwards.
    env = {
        **os.environ, "RAY_AUTH_MODE": "disabled", "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
        "AWS_SECRET_ACCESS_KEY": "job-secret-4f9a1c", "AWS_SESSION_TOKEN": "job-token-77d2e0",
    }
    port, dashboard = _free_port(), _free_port()
    temp = tmp_path_factory.mktemp("ray_head")
    log = (temp / "head.log").open("w")
    # Its own temp folder (short: Ray puts sockets there), so that the address file it
    # leaves behind does not send later ray.init() calls of this session to it.
    ray_tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    head = subprocess.Popen(
        [
            _bin("ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
            f"--object-store-memory={300 * 1024**2}", "--disable-usage-stats", f"--temp-dir={ray_tmp}",
            # Ports of its own: other Ray instances of this session hold the default ones,
            # and a job agent that cannot bind its port never takes a job.
            f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
            f"--ray-client-server-port={_free_port()}",
        ],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                break
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not start: {(temp / 'head.log').read_text()[-2000:]}") from None
            time.sleep(1)
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)
    try:
        # After SIGTERM the head took 34 s to wind down (measured); then its process group is killed.
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
    log.close()
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _submit(address: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    command = [
        _bin("ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
        "python", "ray_jobs/train.py", *args,
    ]
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=800)
        # The head answers HTTP a little before its job agent is up.
        if done.returncode == 0 or "No available agent" not in done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(2)


def test_ray_job_submit_trains_and_leaves_checkpoint_and_report_in_s3(ray_head, s3_bucket, s3_server):
    # S3 (moto's server): the storage the job's workers reach only through the environment it
    # hands them. A local storage path is what the quickstart above and tests/test_train_distributed.py use.
    address, env = ray_head
    endpoint_url = s3_server
    storage = f"{s3_bucket}/runs"
    extra = [f"data.endpoint_url={endpoint_url}"]
    done = _submit(
        address, env, "--config", "configs/quickstart.yaml", "--workers", "2", "--storage-path", storage,
        "--name", "job", *TINY_JOB, *extra,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "succeeded" in (done.stdout + done.stderr)

    run = join(storage, "job")
    fs, _ = filesystem_for(run, endpoint_url=endpoint_url)
    for name in ("checkpoint_0000004/state.pt", "eval/iter_0000004/metrics.json", "model_best.pt", "config.yaml"):
        assert fs.exists(filesystem_for(join(run, name))[1]), name
    metrics = json.loads(fs.cat_file(filesystem_for(join(run, "eval/iter_0000004/metrics.json"))[1]))
    assert 0.0 <= metrics["AP"] <= 1.0 and metrics["extra"]["iteration"] == 4
    summary = json.loads(fs.cat_file(filesystem_for(join(run, "summary.json"))[1]))
    assert summary["iteration"] == 4 and summary["workers"] == 2
    # No credential reaches the run's files.
    for path in fs.find(filesystem_for(run)[1]):
        if not path.endswith(".parquet"):
            content = fs.cat_file(path)
            assert b"job-secret-4f9a1c" not in content and b"job-token-77d2e0" not in content, path
