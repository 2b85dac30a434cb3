"""Bytes a distributed training run reads from object storage per epoch, as a ratio to the
dataset's size (the read amplification), for 1 to 4 workers, with each way of sharing
the shards between them (``data.split``):

- ``images`` (before the shard split): every worker reads every shard and decodes its own
  positions of one global stream;
- ``shards`` (the default): every worker reads only the shards of its piece of the epoch.

The shards live on moto's S3 server, started here on loopback behind a counter of the bytes
it sends in answer to GETs: every read from any process of the cluster passes there, so the
count is what the store served. The cluster is local but has several nodes
(``ray.cluster_utils.Cluster``); each worker is a Ray task (spread over the nodes) that
streams exactly one epoch of its batches with :class:`uniinst.ray.train_stream.TrainStream`,
as a Ray Train worker does, and nothing ahead (no prefetching, which would start the next
epoch's reads). What the driver reads before, once per run start (two small columns of
every shard, which plan the epochs, read once for all the workers as ``uniinst train
--workers`` does; Parquet's footer read is the last 64 KiB of each shard), is counted apart
as ``plan_bytes``.

    python benchmarks/data_reads.py
    python benchmarks/data_reads.py --images 256 --workers 1 2 4 8

The last line of output is one JSON object: ``read_amplification`` (the shard split) and
``read_amplification_images`` (every worker reads every shard) per worker count.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ray

from uniinst.data.prepare import prepare_dataset, serial_executor
from uniinst.data.shards import read_manifest
from uniinst.data.storage import filesystem_for
from uniinst.data.synthetic import generate_synthetic_coco
from uniinst.data.transforms import TrainTransform
from uniinst.ray.train_stream import StreamOptions, TrainStream, kept_images

DATASET = "s3://reads/shards"


class CountingS3:
    """moto's S3 server on a free loopback port, counting the body bytes of its GET answers
    for objects whose key ends with ``suffix``."""

    def __init__(self, suffix: str = ".parquet") -> None:
        from moto.server import ThreadedMotoServer

        self.suffix, self.bytes, self._lock = suffix, 0, threading.Lock()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        counter = self

        class Server(ThreadedMotoServer):
            def _server_entry(self) -> None:
                from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
                from werkzeug.serving import make_server

                app = counter.wrap(DomainDispatcherApplication(create_backend_app))
                self._server = make_server(self._ip_address, self._port, app, True, request_handler=MotoRequestHandler)
                self._server_ready_event.set()
                self._server.serve_forever()

        self.server = Server(ip_address="127.0.0.1", port=port, verbose=False)

    def wrap(self, app: Any) -> Any:
        def counted(environ: dict, start_response: Any) -> Any:
            body = app(environ, start_response)
            if environ["REQUEST_METHOD"] != "GET" or not environ.get("PATH_INFO", "").endswith(self.suffix):
                return body
            return self._count(body)

        return counted

    def _count(self, body: Any) -> Any:
        try:
            for chunk in body:
                with self._lock:
                    self.bytes += len(chunk)
                yield chunk
        finally:
            getattr(body, "close", lambda: None)()

    def reset(self) -> int:
        with self._lock:
            value, self.bytes = self.bytes, 0
        return value


@ray.remote(num_cpus=0.5, scheduling_strategy="SPREAD")
def stream_one_epoch(rank: int, world: int, split: str, endpoint: str, size: int, kept: list) -> dict[str, Any]:
    """Stream rank ``rank``'s batches of epoch 0 (batch 1), and nothing after them."""
    transform = TrainTransform(short_edge=(size,), max_size=size, flip_prob=0.5)
    stream = TrainStream(
        DATASET, batch_size=1, transform=transform, rank=rank, world_size=world, split=split,
        endpoint_url=endpoint, kept=kept, options=StreamOptions(prefetch_batches=0, prefetch_blocks=0),
    )
    per_epoch = stream.plan.per_epoch
    count = per_epoch // world if split == "shards" else len(range(rank, per_epoch, world))
    start = time.perf_counter()
    images = [next(stream).image_ids[0] for _ in range(count)]
    stream.close()
    return {"images": images, "seconds": time.perf_counter() - start}


def measure(s3: CountingS3, split: str, world: int, size: int) -> dict[str, Any]:
    s3.reset()
    # As a Ray Train driver does: the plan's image ids read once, for every worker, at the
    # start of a run (not every epoch).
    kept = kept_images(DATASET, read_manifest(DATASET, endpoint_url=s3.endpoint), s3.endpoint)
    plan_bytes = s3.reset()
    start = time.perf_counter()
    ranks = ray.get([stream_one_epoch.remote(r, world, split, s3.endpoint, size, kept) for r in range(world)])
    seconds = time.perf_counter() - start
    trained = [i for r in ranks for i in r["images"]]
    if len(trained) != len(set(trained)):
        raise RuntimeError(f"split={split}, {world} workers: an image reached two workers in one epoch")
    return {"bytes": s3.reset(), "plan_bytes": plan_bytes, "images": len(trained), "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=128, help="synthetic training images")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--images-per-shard", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--nodes", type=int, default=3, help="nodes of the local cluster, 2 CPUs each")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        os.environ[key] = "bench"
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    from ray.cluster_utils import Cluster

    s3 = CountingS3()
    s3.server.start()
    with tempfile.TemporaryDirectory(prefix="uniinst-reads-") as tmp:
        paths = generate_synthetic_coco(
            Path(tmp) / "synthetic", splits={"train": args.images}, image_size=args.image_size, seed=0
        )
        fs, _ = filesystem_for(DATASET, endpoint_url=s3.endpoint)
        fs.mkdir("reads")
        manifest = prepare_dataset(
            str(paths["train"]), str(Path(tmp) / "synthetic" / "train"), DATASET,
            images_per_shard=args.images_per_shard, endpoint_url=s3.endpoint, executor=serial_executor,
            progress=False,
        )
    size = sum(s.bytes for s in manifest.shards)
    print(f"dataset: {manifest.num_images} images in {len(manifest.shards)} shards, {size / 2**20:.2f} MiB", flush=True)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    for _ in range(args.nodes - 1):
        cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    results: dict[str, dict[str, Any]] = {"images": {}, "shards": {}}
    try:
        for split in ("images", "shards"):
            for world in args.workers:
                row = measure(s3, split, world, args.image_size)
                row["read_amplification"] = row["bytes"] / size
                results[split][str(world)] = row
                print(
                    f"split={split:6s} {world} worker(s): read {row['bytes'] / 2**20:7.2f} MiB = "
                    f"{row['read_amplification']:.3f} x the dataset, {row['images']} images trained, "
                    f"{row['seconds']:.1f} s (planning read {row['plan_bytes'] / 2**20:.2f} MiB before)",
                    flush=True,
                )
    finally:
        ray.shutdown()
        cluster.shutdown()
        s3.server.stop()
    summary = {
        "dataset_bytes": size,
        "shards": len(manifest.shards),
        "images": manifest.num_images,
        "nodes": args.nodes,
        "read_amplification": {w: r["read_amplification"] for w, r in results["shards"].items()},
        "read_amplification_images": {w: r["read_amplification"] for w, r in results["images"].items()},
        "one_shard_per_worker": {w: 1 + (int(w) - 1) / len(manifest.shards) for w in results["shards"]},
        "plan_bytes": results["shards"][str(args.workers[0])]["plan_bytes"],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
