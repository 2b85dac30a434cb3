"""Search α and the loss weights with Ray Tune on the cluster this job runs on; every trial
is a Ray Train run with its own workers.

    ray job submit --working-dir . -- python ray_jobs/tune.py \
        --config configs/tune_loss_weights.yaml --storage-path s3://bucket/searches

The search writes its results table (CSV and Markdown), plots of AP against each searched
key and the best configuration to ``<storage-path>/<name>``. ``--resume`` continues an
interrupted search of the same name: finished trials are kept, unfinished ones resume from
their checkpoints. Extra ``key=value`` arguments override the search config
(``search.num_samples=64``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from uniinst.config import ConfigError
from uniinst.ray.prepare import connect
from uniinst.ray.tune import format_search_summary, run_search
from uniinst.search.config import load_search_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML search config (configs/tune_*.yaml)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted search of this name")
    p.add_argument("--storage-path", help="where searches live: a folder or s3:// / gs:// URI (storage_path)")
    p.add_argument("--name", help="the search's folder name (name)")
    p.add_argument(
        "--set", dest="experiment_overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override the experiment for the trials and the best config (repeatable), "
        "e.g. --set data.train.shards=s3://bucket/shards/train",
    )
    p.add_argument("--address", default="auto", help="Ray cluster address (default: the job's cluster)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the search config, e.g. search.num_samples=64")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_search_config(
            args.config, args.overrides, experiment_overrides=args.experiment_overrides,
            storage_path=args.storage_path, name=args.name,
        )
        connect(args.address)
        result = run_search(cfg, resume=args.resume)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"ray_jobs/tune.py: error: {exc}", file=sys.stderr)
        return 2
    print(format_search_summary(result, cfg))
    return 0 if result.finished else 1


if __name__ == "__main__":
    sys.exit(main())
