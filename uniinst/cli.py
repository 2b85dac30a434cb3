"""The ``uniinst`` command: synth, prepare, train, quickstart, tune, reproduce, convert-weights, export, evaluate,
predict."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from uniinst.redact import Redactor, credentials_in, redact_uri
from uniinst.reproduce.suite import SuiteConfig, comma_names, load_suite

if TYPE_CHECKING:
    from uniinst.config import ExperimentConfig
    from uniinst.data.source import SplitOpener

logger = logging.getLogger("uniinst")

DEFAULT_QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
DEFAULT_AUTHORS_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "uniinst_R50_3x.yaml"


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _cmd_synth(args: argparse.Namespace) -> int:
    from uniinst.data.synthetic import SHAPES, generate_synthetic_coco, occlusion_stats

    paths = generate_synthetic_coco(
        args.out,
        splits={"train": args.train, "val": args.val},
        image_size=args.size,
        num_classes=args.classes,
        shapes=args.shapes or SHAPES,
        occlusion=args.occlusion,
        seed=args.seed,
    )
    for split, path in paths.items():
        stats = occlusion_stats(path)
        print(f"{split}: {path} ({json.dumps(stats)})")
    return 0


def _load_cfg(args: argparse.Namespace):
    from uniinst.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "output_dir", None):
        overrides.append(f"train.output_dir={args.output_dir}")
    return load_config(args.config, overrides)


def _ray_overrides(args: argparse.Namespace) -> list[str]:
    extra = []
    if getattr(args, "workers", None):
        extra.append(f"ray.num_workers={args.workers}")
    if getattr(args, "storage_path", None):
        extra.append(f"ray.storage_path={args.storage_path}")
    if getattr(args, "name", None):
        extra.append(f"ray.name={args.name}")
    return extra


def _split_opener(cfg: ExperimentConfig) -> SplitOpener:
    """How this run reads its datasets: COCO JSON in the core, shards with the Ray layer
    (whose import needs the 'ray' extra)."""
    d = cfg.data
    if d.train.shards or d.val.shards:
        from uniinst.ray.shard_split import open_split

        return open_split
    from uniinst.data.source import open_json_split

    return open_json_split


def _cmd_train(args: argparse.Namespace) -> int:
    if args.workers or args.storage_path:
        from uniinst.ray.train import format_summary, train_ray

        args.overrides = [*args.overrides, *_ray_overrides(args)]
        result = train_ray(_load_cfg(args), resume=not args.no_resume)
        print("\n" + format_summary(result))
        return 0

    from uniinst.engine.local import train_local

    cfg = _load_cfg(args)
    result = train_local(cfg, resume=not args.no_resume, open_split=_split_opener(cfg))
    print(f"\ntrained to iteration {result.iteration}; checkpoint: {result.checkpoint}")
    if result.metrics is not None:
        from uniinst.evaluation.coco_eval import format_table

        print(format_table(result.metrics))
        print(f"mask AP {result.metrics['AP']:.4f}  (report: {result.output_dir / 'eval'})")
    print(f"metrics: {result.output_dir / 'metrics.jsonl'}  tensorboard: {result.output_dir / 'tensorboard'}")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from uniinst.ray.tune import collect_results, format_search_summary, run_search
    from uniinst.search.config import load_search_config

    cfg = load_search_config(
        args.config, args.overrides, experiment_overrides=args.experiment_overrides,
        storage_path=args.storage_path, name=args.name,
    )
    if args.collect:
        result = collect_results(cfg)
    else:
        result = run_search(cfg, resume=args.resume)
    print("\n" + format_search_summary(result, cfg))
    return 0 if result.finished or args.collect else 1


def add_suite_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a reproduction suite, shared by ``uniinst reproduce`` and ray_jobs/reproduce.py."""
    parser.add_argument("--suite", required=True, help="YAML suite (configs/reproduce/*.yaml)")
    parser.add_argument("--out", help="the suite's folder or URI (default: <storage_path>/<name>)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted suite in --out")
    parser.add_argument("--storage-path", help="where suites live when --out is not given (storage_path)")
    parser.add_argument(
        "--variants", type=comma_names, default=[], metavar="NAME,NAME",
        help="run only these variants of the suite (for example uniinst,condinst: Table 1)",
    )
    parser.add_argument(
        "--set", dest="experiment_overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override the experiment of every run (repeatable), e.g. --set data.train.shards=s3://bucket/train",
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the suite, e.g. seeds=[0,1,2]")


def suite_from_args(args: argparse.Namespace) -> SuiteConfig:
    """The suite that :func:`add_suite_arguments`' options name, loaded and checked."""
    return load_suite(
        args.suite, args.overrides, experiment_overrides=args.experiment_overrides,
        storage_path=args.storage_path, variants=args.variants,
    )


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from uniinst.ray.reproduce import collect_suite, run_suite, suite_uri

    suite = suite_from_args(args)
    if args.collect:
        result = collect_suite(suite, suite_uri(suite, args.out), suite.experiment_config())
    else:
        result = run_suite(suite, out=args.out, resume=args.resume)
    print("\n" + result.report)
    print(f"results: {redact_uri(result.uri)} (results.json, report.md, plots/)")
    if not result.finished:
        print("the suite did not finish: continue it with --resume")
    return 0 if result.finished or args.collect else 1


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from uniinst.ray.reproduce import score_run
    from uniinst.ray.train import draw_shard_predictions, format_summary, train_ray

    args.overrides = [*args.overrides, *_ray_overrides(args)]
    cfg = _load_cfg(args)
    print(
        f"quickstart: synthetic shapes -> shards -> Ray Train with {cfg.ray.num_workers} local worker(s) -> "
        f"evaluation -> PNGs, in {cfg.train.output_dir} ...",
        flush=True,
    )
    result = train_ray(cfg)
    if result.best_checkpoint is None:
        raise ValueError("the run kept no model_best.pt: does the config evaluate (data.val)?")
    pred_dir = Path(cfg.train.output_dir) / "predictions"
    drawn = draw_shard_predictions(
        result.best_checkpoint, None, pred_dir, num_images=args.num_images,
        endpoint_url=cfg.data.endpoint_url or None,
    )
    # The paper's first claim, on the quickstart's own model: scored with and without NMS.
    without, with_nms = score_run(result.checkpoint, None, ["none", "mask"], endpoint_url=cfg.data.endpoint_url or None)
    print(
        "\n" + format_summary(result) + f"\n  predictions:  {pred_dir} ({drawn} PNGs)\n"
        f"\nquickstart done after {result.iteration} iterations: val mask AP {without['AP']:.1f} without NMS, "
        f"{with_nms['AP']:.1f} with mask NMS; {without['duplicates_per_gt']:.2f} duplicates per instance "
        "(predictions >= 0.3 that mask NMS would remove, per ground-truth instance)"
    )
    return 0


# What the authors' weights are, whatever the config says: detectron2's caffe-style ResNet,
# trained from the MSRA weights rather than torchvision's.
_AUTHORS_BACKBONE = ("model.backbone.style=caffe", "model.backbone.pretrained=false")


def _cmd_convert_weights(args: argparse.Namespace) -> int:
    from uniinst.config import load_config, to_dict
    from uniinst.engine.adelaidet_weights import convert_state_dict
    from uniinst.engine.checkpoint import load_checkpoint, model_weights, save_checkpoint
    from uniinst.evaluation.categories import COCO_CATEGORY_IDS, COCO_CLASS_NAMES
    from uniinst.modeling.uniinst import build_model

    cfg = load_config(args.config, [*_AUTHORS_BACKBONE, *args.overrides])
    source = load_checkpoint(args.source)
    model = build_model(cfg.model)
    weights, ignored = convert_state_dict(
        model_weights(source, args.source), model.state_dict(), source_name=str(args.source)
    )
    coco = cfg.model.num_classes == len(COCO_CLASS_NAMES)
    state = {
        "model": weights,
        "config": to_dict(cfg),
        "iteration": int(source.get("iteration", 0)),
        "meta": {"class_names": list(COCO_CLASS_NAMES), "category_ids": list(COCO_CATEGORY_IDS)} if coco else {},
    }
    save_checkpoint(state, args.out)
    print(
        f"{args.source} -> {args.out}: {len(weights)} weights, ResNet-{cfg.model.backbone.depth} caffe style, "
        f"{cfg.model.num_classes} classes{' (COCO names)' if coco else ''}; "
        f"{len(ignored)} source keys unused: {', '.join(ignored) or 'none'}"
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from uniinst.evaluation.coco_eval import evaluate_segm, format_table, write_report

    out = Path(args.out)
    if args.results:
        if not args.gt:
            raise SystemExit("uniinst evaluate --results needs --gt GT.json")
        metrics = evaluate_segm(args.gt, args.results)
        write_report(metrics, out, extra={"gt": str(args.gt), "results": str(args.results)})
    elif args.shards:
        if not args.checkpoint:
            raise SystemExit("uniinst evaluate --shards needs --checkpoint")
        metrics = _evaluate_on_shards(args, out)
    else:
        if not args.checkpoint:
            raise SystemExit("uniinst evaluate needs --checkpoint (or --gt and --results)")
        metrics = _evaluate_checkpoint(args, out)
    print(format_table(metrics))
    print(f"written: {out / 'metrics.json'}, {out / 'metrics.md'}")
    return 0


def _load_inference_model(args: argparse.Namespace):
    """The checkpoint's model on the chosen device, with ``--config`` (else the stored
    config) and the command's overrides."""
    from uniinst.engine.inference_model import load_model_for_inference
    from uniinst.engine.trainer import resolve_device

    device = resolve_device(args.device)
    return load_model_for_inference(args.checkpoint, device=device, config=args.config, overrides=args.overrides)


def _evaluate_checkpoint(args: argparse.Namespace, out: Path) -> dict[str, float]:
    """Mask AP of ``--checkpoint`` on a COCO JSON (``--gt``/``--images`` or the config's data.val)."""
    import torch

    from uniinst.data.coco import CocoDataset
    from uniinst.evaluation.inference import evaluate_model

    loaded = _load_inference_model(args)
    cfg = loaded.cfg
    gt = args.gt or cfg.data.val.json
    images = args.images or cfg.data.val.images
    if not gt:
        raise SystemExit("no ground truth: pass --gt GT.json --images DIR, or a config with data.val")
    with torch.inference_mode():
        return evaluate_model(
            loaded.model, CocoDataset(gt, images), out, transform=loaded.transform,
            extra={"checkpoint": str(args.checkpoint), "gt": str(gt)},
            class_names=loaded.class_names, label_map=_label_map(args),
        )


def _label_map(args: argparse.Namespace) -> dict[int, int] | None:
    from uniinst.evaluation.categories import parse_label_map

    return parse_label_map(args.label_map) if args.label_map else None


def _evaluate_on_shards(args: argparse.Namespace, out: Path) -> dict[str, float]:
    """A Ray Data job over the shard dataset ``args.shards``: the ground truth comes from the
    shards, inference from ``args.replicas`` model replicas. The checkpoint is checked
    against its config here, before any Ray task starts."""
    from uniinst.config import to_dict
    from uniinst.data.prepare import parse_categories, read_image_ids
    from uniinst.ray.data import ensure_ray
    from uniinst.ray.evaluate import evaluate_shards

    loaded = _load_inference_model(args)
    use_gpu = next(loaded.model.parameters()).device.type == "cuda"
    state = {
        "model": {k: v.cpu() for k, v in loaded.model.state_dict().items()},
        "config": to_dict(loaded.cfg),
        "meta": {"class_names": loaded.class_names} if loaded.class_names else {},
    }
    ensure_ray()
    return evaluate_shards(
        args.shards,
        state,
        out,
        endpoint_url=args.endpoint_url,
        image_ids=read_image_ids(args.image_ids, endpoint_url=args.endpoint_url) if args.image_ids else None,
        categories=parse_categories(args.categories) if args.categories else None,
        replicas=args.replicas,
        num_gpus=1.0 if use_gpu else 0.0,
        batch_size=args.batch_size,
        extra={"checkpoint": str(args.checkpoint)},
        label_map=_label_map(args),
    )


_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=")


def split_overrides(tokens: Sequence[str]) -> tuple[list[str], list[str]]:
    """``key.sub=value`` tokens apart from the others (image paths); a token that names an
    existing file is a path even if it looks like an override."""
    overrides = [t for t in tokens if _OVERRIDE.match(t) and not Path(t).exists()]
    return [t for t in tokens if t not in overrides], overrides


def _cmd_predict(args: argparse.Namespace) -> int:
    from uniinst.engine.batch_prediction import Destination, format_summary, list_images, predict_images

    inputs, args.overrides = split_overrides(args.inputs)
    if not inputs:
        raise SystemExit("uniinst predict: name at least one image, folder, glob or prefix")
    files = list_images(inputs, endpoint_url=args.endpoint_url)
    dest = Destination(args.out, endpoint_url=args.endpoint_url)
    draw = args.score_thresh if args.draw else None
    if args.ray:
        from uniinst.ray.predict import predict_images_ray

        _check_predictor_options(args)
        summary = predict_images_ray(
            args.checkpoint, files, dest, backend=args.backend, replicas=args.replicas, draw_thresh=draw,
            endpoint_url=args.endpoint_url, class_names=_class_names(args), overrides=args.overrides,
        )
    else:
        loaded = _load_predictor(args)
        if args.class_names:
            loaded.class_names = _class_names(args)
        summary = predict_images(loaded, files, dest, endpoint_url=args.endpoint_url, draw_thresh=draw)
    for bad in summary["unreadable"]:
        print(f"uniinst predict: skipped: {bad['error']}", file=sys.stderr)
    print(format_summary(summary, args.out))
    # Nothing at all to show for the job is an input error; some unreadable images are not.
    return 2 if summary["images"] and not summary["predicted"] else 0


def _class_names(args: argparse.Namespace) -> list[str] | None:
    return args.class_names.split(",") if args.class_names else None


def _check_predictor_options(args: argparse.Namespace) -> None:
    if args.backend != "eager" and (args.config or args.overrides):
        raise ValueError(
            f"--backend {args.backend} runs the exported program as it was exported: "
            "give --config and overrides to uniinst export instead"
        )
    if args.ray and args.config:
        raise ValueError("--ray runs the checkpoint with its stored config (and the overrides): drop --config")


def _load_predictor(args: argparse.Namespace):
    """The model ``uniinst predict`` runs: the checkpoint in PyTorch, or an exported program."""
    _check_predictor_options(args)
    if args.backend == "eager":
        return _load_inference_model(args)
    from uniinst.engine.exported_model import ExportedModel

    return ExportedModel(args.checkpoint, backend=args.backend)


def _cmd_export(args: argparse.Namespace) -> int:
    from uniinst.engine.export import export_model

    args.device = "cpu"
    loaded = _load_inference_model(args)
    dest = export_model(loaded, args.out, fmt=args.format)
    print(f"exported {args.checkpoint} as {args.format}: {dest} ({dest.stat().st_size / 2**20:.1f} MiB)")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from uniinst.data.prepare import format_summary, local_executor, parse_categories, prepare_dataset

    if args.ray:
        from uniinst.ray.prepare import connect, ray_executor

        connect("auto")
        executor = ray_executor()
    else:
        executor = local_executor(args.workers)
    manifest = prepare_dataset(
        args.json,
        args.images,
        args.out,
        images_per_shard=args.images_per_shard,
        on_error=args.on_error,
        endpoint_url=args.endpoint_url,
        executor=executor,
        image_ids=args.image_ids,
        categories=parse_categories(args.categories) if args.categories else None,
    )
    print(format_summary(manifest, args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uniinst", description="UniInst instance segmentation: train, evaluate, predict.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write a synthetic COCO-format dataset of occluding shapes")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--train", type=int, default=64, help="train images")
    s.add_argument("--val", type=int, default=16, help="val images")
    s.add_argument("--size", type=int, default=256, help="image side in pixels")
    s.add_argument("--classes", type=int, default=4, help="number of shape classes (<= 8)")
    s.add_argument(
        "--shapes", type=comma_names, default=[], metavar="NAME,NAME",
        help="the class shapes in category order (default: circle,square,triangle,ellipse,star,ring,cross,hexagon)",
    )
    s.add_argument("--occlusion", choices=["normal", "heavy"], default="normal")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_synth)

    d = sub.add_parser("prepare", help="convert a COCO-format dataset to Parquet shards at a path or URI")
    d.add_argument("--json", required=True, help="COCO-format annotation file (path or URI)")
    d.add_argument("--images", required=True, help="image folder or prefix (path or URI)")
    d.add_argument("--out", required=True, help="where the shards and manifest go (path or URI)")
    d.add_argument("--images-per-shard", type=int, default=1000)
    d.add_argument(
        "--on-error", choices=["raise", "skip"], default="raise", help="skip: leave bad records out and list them"
    )
    d.add_argument("--endpoint-url", help="S3-compatible endpoint (credentials come from the environment)")
    d.add_argument("--image-ids", help="file of image ids to keep, one per line (e.g. an OCHuman subset)")
    d.add_argument("--categories", help="comma-separated category names or ids to keep, e.g. person")
    d.add_argument("--workers", type=int, help="local worker processes (default: the CPU count)")
    d.add_argument("--ray", action="store_true", help="convert on the running Ray cluster (else a local Ray)")
    d.set_defaults(func=_cmd_prepare)

    t = sub.add_parser("train", help="train in this process, or with --workers on a Ray cluster (Ray Train DDP)")
    t.add_argument("--config", required=True, help="YAML experiment config")
    t.add_argument("--output-dir", help="shortcut for train.output_dir=...")
    t.add_argument("--no-resume", action="store_true", help="refuse to continue an existing run")
    t.add_argument("--workers", type=int, help="train with Ray Train on this many workers (ray.num_workers)")
    t.add_argument("--storage-path", help="with Ray: run storage, a folder or s3:// URI (ray.storage_path)")
    t.add_argument("--name", help="with Ray: run name; rerunning a name resumes it (ray.name)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.oyor.alpha=0.8")
    t.set_defaults(func=_cmd_train)

    q = sub.add_parser(
        "quickstart", help="the whole flow on this machine: synthetic shards, Ray Train on 2 workers, evaluation, PNGs"
    )
    q.add_argument("--config", default=str(DEFAULT_QUICKSTART), help="YAML experiment config")
    q.add_argument("--output-dir", help="shortcut for train.output_dir=...")
    q.add_argument("--workers", type=int, help="Ray Train workers (default: the config's ray.num_workers)")
    q.add_argument("--num-images", type=int, default=8, help="val images to draw")
    q.add_argument("overrides", nargs="*", help="dotted overrides, e.g. solver.max_iter=200")
    q.set_defaults(func=_cmd_quickstart)

    u = sub.add_parser(
        "tune", help="search alpha and the loss weights with Ray Tune: each trial a Ray Train run (configs/tune_*.yaml)"
    )
    u.add_argument("--config", required=True, help="YAML search config")
    u.add_argument("--resume", action="store_true", help="continue the interrupted search of this name")
    u.add_argument("--collect", action="store_true", help="only write the table, plots and best config so far")
    u.add_argument("--storage-path", help="where searches live: a folder or s3:// / gs:// URI (storage_path)")
    u.add_argument("--name", help="the search's folder name (name)")
    u.add_argument(
        "--set", dest="experiment_overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override the experiment for the trials and the best config (repeatable), "
        "e.g. --set data.train.shards=s3://bucket/shards/train",
    )
    u.add_argument("overrides", nargs="*", help="dotted overrides of the search config, e.g. search.num_samples=16")
    u.set_defaults(func=_cmd_tune)

    rp = sub.add_parser(
        "reproduce", help="the paper's ablations as a suite of Ray Train runs, reported in its tables "
        "(configs/reproduce/*.yaml)",
    )
    add_suite_arguments(rp)
    rp.add_argument("--collect", action="store_true", help="only write results.json, report.md and plots so far")
    rp.set_defaults(func=_cmd_reproduce)

    cw = sub.add_parser(
        "convert-weights", help="the authors' AdelaiDet UniInst .pth as a checkpoint of this project (docs/models.md)"
    )
    cw.add_argument("source", help="the authors' checkpoint, e.g. UniInst_MS_R_50_3x.pth")
    cw.add_argument("--out", required=True, help="the checkpoint to write (.pt)")
    cw.add_argument(
        "--config", default=str(DEFAULT_AUTHORS_CONFIG),
        help="the model it is (default: configs/uniinst_R50_3x.yaml; the R-101 models: uniinst_R101_6x.yaml)",
    )
    cw.add_argument("overrides", nargs="*", help="dotted config overrides")
    cw.set_defaults(func=_cmd_convert_weights)

    x = sub.add_parser("export", help="the NMS-free model as one ONNX or TorchScript program (docs/models.md)")
    x.add_argument("--checkpoint", required=True, help="model checkpoint (.pt)")
    x.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    x.add_argument("--out", required=True, help="the file to write, e.g. model.onnx")
    x.add_argument("--config", help="config (default: the one stored in the checkpoint)")
    x.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.inference.score_thresh=0.05")
    x.set_defaults(func=_cmd_export)

    e = sub.add_parser("evaluate", help="COCO mask AP of a checkpoint, or of an existing results file")
    e.add_argument("--checkpoint", help="model checkpoint (.pt)")
    e.add_argument("--config", help="config (default: the one stored in the checkpoint)")
    e.add_argument("--gt", help="COCO-format ground-truth JSON")
    e.add_argument("--images", help="image folder of --gt")
    e.add_argument("--results", help="COCO results JSON to score instead of running a model")
    e.add_argument("--shards", help="evaluate on a shard dataset (path or URI) as a Ray Data job")
    e.add_argument("--image-ids", help="with --shards: file of image ids to evaluate, one per line (OCHuman subset)")
    e.add_argument("--categories", help="with --shards: comma-separated category names or ids to evaluate, e.g. person")
    e.add_argument("--replicas", type=int, default=1, help="with --shards: model replicas (one GPU each on GPU)")
    e.add_argument("--batch-size", type=int, default=1, help="with --shards: images per forward pass")
    e.add_argument("--endpoint-url", help="S3-compatible endpoint (credentials come from the environment)")
    e.add_argument(
        "--label-map", metavar="LABEL=ID,...",
        help="model label to ground-truth category id, e.g. 0=1,1=18, for a model whose classes the ground truth "
        "does not name (default: by class name, or in order when the counts match)",
    )
    e.add_argument("--out", required=True, help="folder for metrics.json and metrics.md")
    e.add_argument("--device", default="auto")
    e.add_argument("overrides", nargs="*", help="dotted config overrides")
    e.set_defaults(func=_cmd_evaluate)

    r = sub.add_parser(
        "predict", help="predictions.jsonl (and with --draw PNGs) for images, folders, globs or a URI prefix"
    )
    r.add_argument(
        "inputs", nargs="+", metavar="IMAGES_OR_OVERRIDE",
        help="image files, folders, globs or URI prefixes (s3://bucket/images/), then any dotted config "
        "overrides, e.g. model.inference.score_thresh=0.2",
    )
    r.add_argument("--checkpoint", required=True, help="a checkpoint (.pt), or with --backend an exported file")
    r.add_argument("--backend", choices=["eager", "onnx", "torchscript"], default="eager",
                   help="eager: the checkpoint in PyTorch; onnx, torchscript: a file from uniinst export")
    r.add_argument("--config", help="config (default: the one stored in the checkpoint)")
    r.add_argument("--out", required=True, help="output folder or URI: predictions.jsonl, summary.json, PNGs")
    r.add_argument("--draw", action="store_true", help="also draw each image's instances as a PNG")
    r.add_argument("--score-thresh", type=float, default=0.3, help="the lowest score drawn (with --draw)")
    r.add_argument("--class-names", help="comma-separated class names (default: from the checkpoint)")
    r.add_argument("--device", default="auto")
    r.add_argument("--ray", action="store_true", help="a Ray Data job with --replicas model replicas (docs/data.md)")
    r.add_argument("--replicas", type=int, default=1, help="model replicas of the --ray job (a GPU each where there are)")
    r.add_argument("--endpoint-url", help="S3-compatible endpoint (credentials come from the environment)")
    r.set_defaults(func=_cmd_predict)
    return p


# The extra that provides each optional dependency: "ray" for shards, object storage and Ray
# Train/Data/Tune; "export" for ONNX export and ONNX Runtime.
_EXTRAS = {
    **dict.fromkeys(("ray", "pyarrow", "fsspec", "s3fs", "aiobotocore", "optuna"), "ray"),
    **dict.fromkeys(("onnx", "onnxscript", "onnxruntime"), "export"),
}
# Errors that the input (arguments, configs, files, data) causes: one line, exit code 2.
_INPUT_ERRORS = (ValueError, OSError)


def _parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The arguments, with overrides (and for predict, images) also after the options:
    argparse takes a command's positionals only in one run."""
    args, extra = parser.parse_known_args(argv)
    target = "inputs" if hasattr(args, "inputs") else "overrides"
    stray = [t for t in extra if t.startswith("-") or (target == "overrides" and not _OVERRIDE.match(t))]
    if stray or (extra and not hasattr(args, target)):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    getattr(args, target, []).extend(extra)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse_args(build_parser(), argv)
    redact = Redactor(credentials_in(argv))
    _setup_logging(args.verbose)
    for handler in logging.getLogger().handlers:
        handler.addFilter(redact)
    try:
        return args.func(args)
    except ModuleNotFoundError as exc:
        extra = _EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            return _crash(args.command, redact)
        message = f"this needs the '{extra}' extra ({exc}): pip install 'uniinst[{extra}]'"
    except _INPUT_ERRORS as exc:
        message = str(exc) or type(exc).__name__
    except KeyboardInterrupt:
        print(f"uniinst {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        return _crash(args.command, redact)
    print(f"uniinst {args.command}: error: {redact(message)}", file=sys.stderr)
    return 2


def _crash(command: str, redact: Redactor) -> int:
    """An error of ours, not of the input: the whole traceback, with no credentials in it."""
    print(redact(traceback.format_exc()), file=sys.stderr, end="")
    print(f"uniinst {command}: internal error (the traceback above); please report it", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
