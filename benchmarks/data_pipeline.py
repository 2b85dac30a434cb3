"""Training-data throughput: the Ray Data shard stream from S3 and from local disk, next to a
plain torch DataLoader over the JSON reader, and how long a training step waits for data.

All three produce the same kind of training batches (read, decode, resize of the shortest
edge to ``--short-edge``, random flip, stride-4 mask targets, padding):

- ``stream_s3``: :class:`uniinst.ray.train_stream.TrainStream` over shards on an S3 endpoint
  (moto's server, started here on loopback; the dataset is converted straight into it);
- ``stream_local``: the same stream over the same shards in a local folder;
- ``dataloader``: ``InstanceSegDataset`` + ``build_train_loader`` over the COCO JSON and the
  image folder, with ``--workers`` worker processes.

Each is timed over ``--batches`` batches after ``--warmup`` batches (which absorb Ray's and the
workers' start-up). Epoch boundaries fall inside the timed window on a small dataset: the
stream restarts its pipeline at each, and that cost is part of its throughput.

The data wait: the small CPU model (``configs/synth_R18_uniinst.yaml``, its class count set to
the dataset's) trains ``--steps`` steps on the S3 stream, at that config's own image sizes;
the mean time ``next(batches)`` blocks is reported next to the mean step time.

    python benchmarks/data_pipeline.py                       # coco_tiny train, if present
    python benchmarks/data_pipeline.py --data /path/to/coco  # annotations/instances_train2017.json + train2017/
    python benchmarks/data_pipeline.py --data synthetic

The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Iterator

import ray
import torch

from uniinst.config import load_config
from uniinst.data.coco import CocoDataset
from uniinst.data.dataset import InstanceSegDataset, build_train_loader
from uniinst.data.prepare import local_executor, prepare_dataset
from uniinst.data.storage import filesystem_for
from uniinst.data.synthetic import generate_synthetic_coco
from uniinst.data.transforms import TrainTransform
from uniinst.engine.trainer import Trainer
from uniinst.modeling.uniinst import build_model
from uniinst.ray.train_stream import TrainStream
from uniinst.structures import Batch

REPO = Path(__file__).resolve().parent.parent
COCO_TINY = REPO.parent / "shared" / "data" / "coco_tiny"
SMALL_CONFIG = REPO / "configs" / "synth_R18_uniinst.yaml"


def find_dataset(data: str | None, workdir: Path) -> tuple[str, Path, Path]:
    """``(name, json, image folder)``: a COCO-layout folder, coco_tiny, or a synthetic set."""
    if data is None and COCO_TINY.is_dir():
        data = str(COCO_TINY)
    if data is None or data == "synthetic":
        paths = generate_synthetic_coco(workdir / "synthetic", splits={"train": 80}, image_size=640, num_classes=8, seed=0)
        return "synthetic", paths["train"], workdir / "synthetic" / "train"
    root = Path(data)
    json_path, images = root / "annotations" / "instances_train2017.json", root / "train2017"
    if not json_path.is_file() or not images.is_dir():
        raise SystemExit(f"--data {root}: expected annotations/instances_train2017.json and train2017/")
    return root.name, json_path, images


def start_s3() -> tuple[object, str]:
    """A moto S3 server on a free loopback port, with dummy credentials in this process's
    environment (Ray workers started afterwards inherit them)."""
    from moto.server import ThreadedMotoServer

    for key, value in {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_SESSION_TOKEN": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ[key] = value
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def images_per_second(batches: Iterator[Batch], *, warmup: int, count: int) -> dict[str, float]:
    for _ in range(warmup):
        next(batches)
    images, start = 0, time.perf_counter()
    for _ in range(count):
        images += len(next(batches))
    seconds = time.perf_counter() - start
    return {"images_per_s": images / seconds, "seconds": seconds, "images": images}


def data_wait(batches: Iterator[Batch], trainer: Trainer, *, warmup: int, steps: int) -> dict[str, float]:
    waits, step_times = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        trainer.step(batch)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        t2 = time.perf_counter()
        if i >= warmup:
            waits.append(t1 - t0)
            step_times.append(t2 - t1)
    return {
        "data_wait_ms": 1000 * statistics.mean(waits),
        "data_wait_max_ms": 1000 * max(waits),
        "step_ms": 1000 * statistics.mean(step_times),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="COCO-layout folder, or 'synthetic' (default: coco_tiny if present)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--batches", type=int, default=30, help="timed batches per pipeline")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    p.add_argument("--short-edge", type=int, default=800)
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--images-per-shard", type=int, default=16)
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="Ray CPUs, and DataLoader workers")
    p.add_argument("--steps", type=int, default=8, help="timed training steps for the data wait (0: skip)")
    p.add_argument("--device", default="cpu", help="device of the data-wait training steps")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory(prefix="uniinst-bench-") as tmp:
        workdir = Path(tmp)
        name, json_path, images = find_dataset(args.data, workdir)
        server, endpoint = start_s3()
        try:
            local_uri = str(workdir / "shards")
            s3_uri = "s3://bench/shards"
            fs, _ = filesystem_for(s3_uri, endpoint_url=endpoint)
            fs.mkdir("bench")
            for out in (local_uri, s3_uri):
                manifest = prepare_dataset(
                    str(json_path), str(images), out, images_per_shard=args.images_per_shard,
                    endpoint_url=endpoint, executor=local_executor(args.cpus), progress=False,
                )
            ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
            from ray.data import DataContext

            DataContext.get_current().enable_progress_bars = False

            transform = TrainTransform(short_edge=(args.short_edge,), max_size=args.max_size, flip_prob=0.5)
            timing = dict(warmup=args.warmup, count=args.batches)
            results: dict[str, dict] = {}

            def stream(uri: str, **kwargs) -> Iterator[Batch]:
                return TrainStream(uri, batch_size=args.batch_size, transform=transform, **kwargs)

            for key, batches in (
                ("stream_s3", lambda: stream(s3_uri, endpoint_url=endpoint)),
                ("stream_local", lambda: stream(local_uri)),
                (
                    "dataloader",
                    lambda: build_train_loader(
                        InstanceSegDataset(CocoDataset(json_path, images), transform, skip_empty=True),
                        batch_size=args.batch_size,
                        num_workers=args.cpus,
                    ),
                ),
            ):
                it = batches()
                results[key] = images_per_second(it, **timing)
                getattr(it, "close", lambda: None)()
                print(f"{key:13s} {results[key]['images_per_s']:8.1f} images/s ({results[key]['images']} images)", flush=True)

            wait = None
            if args.steps:
                cfg = load_config(SMALL_CONFIG, [f"model.num_classes={len(manifest.categories)}", "solver.amp=false"])
                device = torch.device(args.device)
                model = build_model(cfg.model).to(device)
                trainer = Trainer(model, cfg, device=device)
                d = cfg.data
                small = TrainTransform(short_edge=tuple(d.min_size_train), max_size=d.max_size_train, flip_prob=d.flip_prob)
                it = TrainStream(s3_uri, batch_size=d.batch_size, transform=small, endpoint_url=endpoint)
                wait = {
                    **data_wait(it, trainer, warmup=2, steps=args.steps),
                    "steps": args.steps,
                    "batch_size": d.batch_size,
                    "short_edge": list(d.min_size_train),
                    "device": str(device),
                }
                it.close()
                print(
                    f"training on the S3 stream: data wait {wait['data_wait_ms']:.1f} ms "
                    f"(max {wait['data_wait_max_ms']:.1f}) per step of {wait['step_ms']:.1f} ms",
                    flush=True,
                )
        finally:
            ray.shutdown()
            server.stop()

    summary = {
        "data": name,
        "images": manifest.num_images,
        "shards": len(manifest.shards),
        "batch_size": args.batch_size,
        "short_edge": args.short_edge,
        "timed_batches": args.batches,
        "cpus": args.cpus,
        "torch_threads": torch.get_num_threads(),
        **{f"{k}_images_per_s": round(v["images_per_s"], 2) for k, v in results.items()},
        "train": None if wait is None else {k: round(v, 2) if isinstance(v, float) else v for k, v in wait.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
