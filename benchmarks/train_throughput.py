"""Distributed training throughput: images/s of Ray Train with 1 and with 2 workers (DDP) on
the same run, and the fraction of step time each worker spends waiting for data.

Both runs train the same config on the same shards with the same per-worker batch, so 2
workers process twice the global batch per step: ``speedup`` is images/s with 2 workers over
images/s with 1, ``scaling_efficiency`` that over 2. On one machine the workers share its
cores, so on a 2-core CPU the speedup is bounded by the cores, not by the framework; on a GPU
machine each worker gets a GPU (``--gpu``).

The figures are means over the logged windows after ``--warmup`` iterations (which absorb
Ray's start-up and the first epoch's pipeline start): ``images_per_sec`` is global (a
worker's rate times the workers), ``data_wait_fraction`` the mean share of a step that
``next(batches)`` blocked.

    python benchmarks/train_throughput.py                       # CPU, synthetic shards, 40 iterations
    python benchmarks/train_throughput.py --iters 200 --gpu --config configs/uniinst_R50_3x.yaml \\
        data.train.shards=s3://bucket/shards/coco_train2017 data.val.shards=   # a GPU machine

The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from uniinst.config import load_config
from uniinst.engine.metrics import read_metrics
from uniinst.ray.prepare import connect
from uniinst.ray.train import train_ray

REPO = Path(__file__).resolve().parent.parent


def run(config: str, workers: int, out: Path, args: argparse.Namespace) -> dict[str, float]:
    overrides = [
        f"ray.num_workers={workers}",
        f"solver.max_iter={args.iters}",
        f"train.log_period={args.log_period}",
        "train.checkpoint_period=0",
        "train.eval_period=0",
        "data.val.json=",
        "data.val.images=",
        "data.val.shards=",
        f"train.output_dir={out}",
        *(["ray.use_gpu=true"] if args.gpu else []),
        *args.overrides,
    ]
    cfg = load_config(config, overrides)
    synthetic = cfg.data.synthetic
    shared = out.parent / "shards"
    if synthetic:
        # The shards are made once, in the first run's folder, then shared.
        if (shared / "train" / "manifest.json").is_file():
            cfg.data.synthetic = False
            cfg.data.train.shards = str(shared / "train")
    t0 = time.perf_counter()
    train_ray(cfg)
    wall = time.perf_counter() - t0
    if synthetic and not shared.exists():
        os.replace(out / "data", shared)
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "train/images_per_sec" in r and r["iteration"] > args.warmup]
    if not rows:
        raise SystemExit(f"no logged window after the warm-up: raise --iters above {args.warmup}")
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    return {
        "images_per_sec": mean("train/images_per_sec"),
        "step_ms": 1000 * mean("train/step_time"),
        "data_wait_ms": 1000 * mean("train/data_time"),
        "data_wait_fraction": mean("train/data_wait_fraction"),
        "global_batch": cfg.data.batch_size * workers,
        "wall_s": wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    p.add_argument("--iters", type=int, default=40, help="iterations per run")
    p.add_argument("--warmup", type=int, default=10, help="iterations left out of the figures")
    p.add_argument("--log-period", type=int, default=5)
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    connect()
    figures = {}
    with tempfile.TemporaryDirectory(prefix="uniinst-throughput-") as tmp:
        for workers in (1, 2):
            figures[workers] = run(args.config, workers, Path(tmp) / f"w{workers}", args)
    print(f"{'workers':>8} {'img/s':>8} {'step ms':>9} {'wait ms':>9} {'wait %':>7} {'batch':>6}")
    for w, f in figures.items():
        print(
            f"{w:>8} {f['images_per_sec']:>8.2f} {f['step_ms']:>9.0f} {f['data_wait_ms']:>9.1f} "
            f"{100 * f['data_wait_fraction']:>6.1f}% {f['global_batch']:>6}"
        )
    speedup = figures[2]["images_per_sec"] / figures[1]["images_per_sec"]
    print(
        json.dumps(
            {
                "workers_1": figures[1],
                "workers_2": figures[2],
                "speedup": speedup,
                "scaling_efficiency": speedup / 2,
                "cpus": os.cpu_count(),
                "gpu": args.gpu,
            }
        )
    )


if __name__ == "__main__":
    main()
