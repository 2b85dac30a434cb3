"""Train UniInst with Ray Train (DDP) on the cluster this job runs on.

    ray job submit --working-dir . -- python ray_jobs/train.py \
        --config configs/uniinst_R50_3x.yaml --workers 16 --gpu \
        --storage-path s3://bucket/runs --name r50_3x

Rerunning with the same --storage-path and --name resumes the run from its newest
checkpoint. Credentials come from the workers' environment or instance role, never from
arguments or configs. Extra ``key=value`` arguments override the config
(``model.oyor.alpha=0.8``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from uniinst.config import ConfigError, load_config
from uniinst.ray.prepare import connect
from uniinst.ray.train import format_summary, train_ray


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML experiment config")
    p.add_argument("--workers", type=int, help="number of workers (ray.num_workers)")
    p.add_argument("--min-workers", type=int, help="elastic: fewest workers to keep training with (ray.min_workers)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (ray.use_gpu=true)")
    p.add_argument("--storage-path", help="run storage: a folder or s3:// / gs:// URI (ray.storage_path)")
    p.add_argument("--name", help="run name; rerunning a name resumes the run (ray.name)")
    p.add_argument("--no-resume", action="store_true", help="fail instead of resuming an existing run")
    p.add_argument("--address", default="auto", help="Ray cluster address (default: the job's cluster)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. solver.max_iter=1000")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides)
    for key, value in (
        ("ray.num_workers", args.workers),
        ("ray.min_workers", args.min_workers),
        ("ray.storage_path", args.storage_path),
        ("ray.name", args.name),
    ):
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.gpu:
        overrides.append("ray.use_gpu=true")
    try:
        cfg = load_config(args.config, overrides)
        connect(args.address)
        result = train_ray(cfg, resume=not args.no_resume)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"ray_jobs/train.py: error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
