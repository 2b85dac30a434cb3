"""Shared fixtures: a tiny CPU model config, a small synthetic dataset, an S3 endpoint, a local Ray."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest
import torch

from uniinst.config import ExperimentConfig, load_config
from uniinst.data.synthetic import generate_synthetic_coco

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# The quickstart's small config shrunk further so a step takes milliseconds.
TINY = [
    "model.fpn_channels=32",
    "model.head.num_groups=8",
    "model.mask_branch.channels=32",
    "data.min_size_train=[128]",
    "data.max_size_train=128",
    "data.min_size_test=128",
    "data.max_size_test=128",
    "data.num_workers=0",
    "data.batch_size=2",
    "solver.warmup_iters=5",
    "train.log_period=1",
    "train.checkpoint_period=0",
]


# The small model on 128-px synthetic shapes of a few images: a whole Ray job or search
# trial in seconds on a 2-core machine.
TINY_SYNTHETIC = [
    "model.fpn_channels=32",
    "model.head.num_groups=8",
    "model.mask_branch.channels=32",
    "data.synthetic_train_images=8",
    "data.synthetic_val_images=4",
    "data.synthetic_image_size=128",
    "data.min_size_train=[128]",
    "data.max_size_train=128",
    "data.min_size_test=128",
    "data.max_size_test=128",
]


def coco_tiny_root() -> Path | None:
    root = Path(os.environ.get("UNIINST_COCO_TINY", REPO.parent / "shared" / "data" / "coco_tiny"))
    return root if (root / "annotations").is_dir() else None


@pytest.fixture(autouse=True)
def _few_threads():
    # The CI machines have 2 cores; more threads only add contention.
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic_coco(root, splits={"train": 8, "val": 4}, image_size=128, num_classes=4, seed=0)
    return root


def tiny_config(root: Path, output_dir: Path, *extra: str) -> ExperimentConfig:
    return load_config(
        CONFIGS / "synth_R18_uniinst.yaml",
        [
            *TINY,
            "data.synthetic=false",
            f"data.train.json={root / 'annotations' / 'instances_train.json'}",
            f"data.train.images={root / 'train'}",
            f"data.val.json={root / 'annotations' / 'instances_val.json'}",
            f"data.val.images={root / 'val'}",
            f"train.output_dir={output_dir}",
            *extra,
        ],
    )


# --------------------------------------------------------------------------- object storage and Ray

# Dummy credentials: moto accepts any, and every client (s3fs, boto3, Ray workers started
# after this) reads them from the environment exactly as it would real ones.
_AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def aws_test_env():
    saved = {key: os.environ.get(key) for key in _AWS_TEST_ENV}
    os.environ.update(_AWS_TEST_ENV)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server(aws_test_env) -> str:
    """The endpoint URL of a real S3 HTTP server (moto) on loopback."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """``s3://<a fresh bucket>`` on :func:`s3_server`."""
    from uniinst.data.storage import filesystem_for

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fs, _ = filesystem_for(f"s3://{bucket}", endpoint_url=s3_server)
    fs.mkdir(bucket)
    return f"s3://{bucket}"


_RAY_SESSION = {"local": False}


def start_local_ray():
    """The small local Ray the tests share (its workers inherit the test credentials)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] = "1"
    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    # "local": a Ray of our own even when `ray start` runs on this machine.
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024**2, log_to_driver=False
    )
    limit_ray_data()
    return ray


def limit_ray_data() -> None:
    from ray.data import DataContext, ExecutionOptions, ExecutionResources

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options = ExecutionOptions(
        resource_limits=ExecutionResources(cpu=2, object_store_memory=150 * 1024**2)
    )


@pytest.fixture(scope="session")
def ray_local(aws_test_env):
    """A small local Ray for the whole session. A module that needs another cluster shuts
    it down and calls :func:`restore_local_ray` when done."""
    ray = pytest.importorskip("ray")
    start_local_ray()
    _RAY_SESSION["local"] = True
    yield ray
    _RAY_SESSION["local"] = False
    ray.shutdown()


def restore_local_ray() -> None:
    """Bring back the session's local Ray if a fixture had started it."""
    import ray

    if _RAY_SESSION["local"] and not ray.is_initialized():
        start_local_ray()
