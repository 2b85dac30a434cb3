"""Convert a COCO-format dataset to Parquet shards on a Ray cluster.

    ray job submit --working-dir . -- python ray_jobs/prepare_data.py \
        --json s3://bucket/coco/annotations/instances_train2017.json \
        --images s3://bucket/coco/train2017 --out s3://bucket/shards/coco_train2017

Credentials come from the workers' environment or instance role, never from arguments.
Rerunning the same command completes an interrupted conversion.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from uniinst.data.prepare import format_summary, parse_categories, prepare_dataset
from uniinst.ray.prepare import connect, ray_executor


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="COCO-format annotation file (path or URI)")
    p.add_argument("--images", required=True, help="image folder or prefix (path or URI)")
    p.add_argument("--out", required=True, help="where the shards and manifest go (path or URI)")
    p.add_argument("--images-per-shard", type=int, default=1000)
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint, e.g. http://minio:9000")
    p.add_argument("--image-ids", help="file of image ids to keep, one per line")
    p.add_argument("--categories", help="comma-separated category names or ids to keep")
    p.add_argument("--address", default="auto", help="Ray cluster address (default: the running one, else local)")
    p.add_argument("--max-in-flight", type=int, help="shards converted at once (default: 2x the cluster CPUs, growing with the cluster)")
    p.add_argument("--max-retries", type=int, default=3, help="reruns of a shard whose task failed")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    connect(args.address)
    try:
        manifest = prepare_dataset(
            args.json,
            args.images,
            args.out,
            images_per_shard=args.images_per_shard,
            on_error=args.on_error,
            endpoint_url=args.endpoint_url,
            executor=ray_executor(max_in_flight=args.max_in_flight, max_retries=args.max_retries),
            image_ids=args.image_ids,
            categories=parse_categories(args.categories) if args.categories else None,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"prepare_data: error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(manifest, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
