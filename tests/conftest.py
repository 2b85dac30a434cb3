"""Shared fixtures: a tiny CPU model config and a small synthetic dataset."""

from __future__ import annotations

import os
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
