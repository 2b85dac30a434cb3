"""Run a reproduction suite (configs/reproduce/*.yaml) on the cluster this job runs on:
every (variant, seed) is a Ray Train run scheduled by Ray Tune, scored on every split with
every NMS mode, and the results are written in the paper's tables.

    ray job submit --working-dir . -- python ray_jobs/reproduce.py \
        --suite configs/reproduce/coco_R50.yaml --out s3://bucket/reproduce/coco_R50

``--resume`` continues an interrupted suite in the same --out: finished runs are kept,
unfinished ones resume from their checkpoints. Extra ``key=value`` arguments override the
suite (``seeds=[0,1,2]``); ``--set`` overrides the experiment of every run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from uniinst.cli import add_suite_arguments, suite_from_args
from uniinst.config import ConfigError
from uniinst.ray.prepare import connect
from uniinst.ray.reproduce import run_suite
from uniinst.redact import redact_text, redact_uri


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_suite_arguments(p)
    p.add_argument("--address", default="auto", help="Ray cluster address (default: the job's cluster)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        suite = suite_from_args(args)
        connect(args.address)
        result = run_suite(suite, out=args.out, resume=args.resume)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"ray_jobs/reproduce.py: error: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    print(result.report)
    print(f"results: {redact_uri(result.uri)}")
    return 0 if result.finished else 1


if __name__ == "__main__":
    sys.exit(main())
