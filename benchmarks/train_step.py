"""Time of one UniInst training step, the OYOR assignment's share of it, and a torchvision
Mask R-CNN training step on the same batch.

The batch is two synthetic images of ten occluding shapes (800×1088 and 768×1024, padded
to 800×1088). A step is forward + backward + SGD step, through
:meth:`uniinst.engine.trainer.Trainer.step` for UniInst and the equivalent plain loop for
Mask R-CNN. The assignment (``criterion.assign``: candidates, their masks, Dice, Hungarian
matching) is also timed on its own, on the features of the current weights.

Mask R-CNN trains as torchvision builds it for fine-tuning from ImageNet weights (frozen
BatchNorm, stem and res2 frozen), which is also UniInst's setting (``FrozenBN``,
``freeze_at=2``); no weights are loaded. It gets the same pixels and instances: boxes from
the masks, labels + 1 (0 is its background), masks at image size, and no internal resize.

After warm-up the three timings are interleaved (step, assign, Mask R-CNN step, ...) and
the medians reported. The last line of output is one JSON object with the results.

    python benchmarks/train_step.py                        # CPU: 5 timed iterations
    python benchmarks/train_step.py --device cuda --amp    # GPU, fp16 autocast
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from uniinst.config import load_config
from uniinst.data.coco import CocoDataset
from uniinst.data.collate import collate
from uniinst.data.synthetic import generate_synthetic_coco
from uniinst.engine.trainer import Trainer
from uniinst.modeling.criterion import FlatOutputs
from uniinst.modeling.uniinst import build_model
from uniinst.structures import Batch, Sample

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "uniinst_R50_3x.yaml"
IMAGE_SIZES = ((800, 1088), (768, 1024))
INSTANCES_PER_IMAGE = 10


def synthetic_samples(sizes: tuple[tuple[int, int], ...], *, seed: int = 0) -> list[Sample]:
    """One synthetic image of (up to) ten occluding shapes per (h, w), with its visible masks."""
    samples = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (h, w) in enumerate(sizes):
            root = Path(tmp) / f"image{i}"
            json_path = generate_synthetic_coco(
                root,
                splits={"bench": 1},
                image_size=(h, w),
                num_classes=8,
                min_instances=INSTANCES_PER_IMAGE,
                max_instances=INSTANCES_PER_IMAGE,
                seed=seed + i,
            )["bench"]
            record = CocoDataset(json_path, root / "bench").load(0)
            samples.append(
                Sample(
                    image=torch.from_numpy(record.image).permute(2, 0, 1).contiguous(),
                    masks=torch.from_numpy(record.masks),
                    labels=torch.from_numpy(record.labels),
                    image_id=i,
                    orig_size=(h, w),
                )
            )
    return samples


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1000.0


def build_maskrcnn() -> MaskRCNN:
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3)
    # _skip_resize: the images keep their sizes, as in torchvision's reference training
    # scripts when the data pipeline does the resizing.
    return MaskRCNN(backbone, num_classes=91, _skip_resize=True)


def maskrcnn_inputs(samples: list[Sample], batch: Batch, device: torch.device) -> tuple[list, list]:
    images = [(s.image.float() / 255.0).to(device) for s in samples]
    targets = [
        {
            # The boxes UniInst's targets hold: the masks' extents in input pixels.
            "boxes": t.boxes.to(device),
            "labels": (t.labels + 1).to(device),
            "masks": s.masks.to(device),
        }
        for s, t in zip(samples, batch.targets or [])
    ]
    return images, targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default 5 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 1 on CPU, 3 on CUDA)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--amp", action="store_true", help="fp16 autocast with gradient scaling (CUDA only)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="UniInst config")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device} but CUDA is not available")
    if args.amp and device.type != "cuda":
        parser.error("--amp needs --device cuda")
    iters = args.iters if args.iters is not None else (5 if device.type == "cpu" else 20)
    warmup = args.warmup if args.warmup is not None else (1 if device.type == "cpu" else 3)
    if iters < 1 or warmup < 0 or args.threads < 1:
        parser.error("--iters and --threads must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    samples = synthetic_samples(IMAGE_SIZES)
    batch = collate(samples).to(device)

    cfg = load_config(args.config, ["model.backbone.pretrained=false", f"solver.amp={str(args.amp).lower()}"])
    if cfg.model.arch != "uniinst":
        parser.error(f"--config {args.config}: model.arch must be uniinst (the OYOR assignment is timed)")
    model = build_model(cfg.model).to(device)
    trainer = Trainer(model, cfg, device=device)

    maskrcnn = build_maskrcnn().to(device).train()
    mr_images, mr_targets = maskrcnn_inputs(samples, batch, device)
    solver = cfg.solver
    mr_optimizer = torch.optim.SGD(
        [p for p in maskrcnn.parameters() if p.requires_grad],
        lr=trainer.base_lr,
        momentum=solver.momentum,
        weight_decay=solver.weight_decay,
    )
    mr_scaler = torch.amp.GradScaler("cuda", enabled=args.amp)

    def uniinst_step() -> None:
        trainer.step(batch)

    def assign(out: FlatOutputs, mask_feats: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.float16, enabled=args.amp):
            model.criterion.assign(model.mask_head, mask_feats, out, batch.targets)

    def maskrcnn_step() -> None:
        with torch.autocast(device.type, dtype=torch.float16, enabled=args.amp):
            losses = maskrcnn(mr_images, mr_targets)
        total = sum(losses.values())
        mr_optimizer.zero_grad(set_to_none=True)
        mr_scaler.scale(total).backward()
        mr_scaler.step(mr_optimizer)
        mr_scaler.update()
        float(total.detach())  # the loss read-back Trainer.step does too

    def features() -> tuple[FlatOutputs, torch.Tensor]:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=args.amp):
            out, mask_feats, _ = model.features(batch.images, batch.image_sizes)
        return out, mask_feats

    times: dict[str, list[float]] = {"step": [], "assign": [], "maskrcnn_step": []}
    for i in range(warmup + iters):
        step_ms = time_ms(uniinst_step, device)
        # The assignment runs on the features of the weights the step just produced;
        # computing them is not part of its timing.
        out, mask_feats = features()
        assign_ms = time_ms(lambda: assign(out, mask_feats), device)
        maskrcnn_ms = time_ms(maskrcnn_step, device)
        if i >= warmup:
            times["step"].append(step_ms)
            times["assign"].append(assign_ms)
            times["maskrcnn_step"].append(maskrcnn_ms)

    medians = {name: statistics.median(t) for name, t in times.items()}
    share = medians["assign"] / medians["step"]
    ratio = medians["step"] / medians["maskrcnn_step"]
    precision = "fp16 autocast" if args.amp else "fp32"
    instances = [len(t) for t in batch.targets]
    print(
        f"batch {len(batch)} images {[tuple(s.image.shape[1:]) for s in samples]} padded to "
        f"{tuple(batch.images.shape[2:])}, instances {instances}"
    )
    print(f"{device}, {precision}, threads {args.threads}, torch {torch.__version__}")
    print(f"{'timing':<32}{'median ms':>11}{'min ms':>9}{'max ms':>9}")
    labels = {
        "step": "UniInst R-50 step",
        "assign": "  of which OYOR assign",
        "maskrcnn_step": "Mask R-CNN R-50 step",
    }
    for name, label in labels.items():
        t = times[name]
        print(f"{label:<32}{medians[name]:>11.1f}{min(t):>9.1f}{max(t):>9.1f}")
    print(f"assign share of the step: {share:.3f}; step ratio UniInst / Mask R-CNN: {ratio:.3f}  (medians of {iters})")
    print(
        json.dumps(
            {
                "step_ms": round(medians["step"], 2),
                "assign_ms": round(medians["assign"], 2),
                "assign_share": round(share, 4),
                "maskrcnn_step_ms": round(medians["maskrcnn_step"], 2),
                "ratio": round(ratio, 4),
                "device": str(device),
                "threads": args.threads,
                "iters": iters,
                "amp": args.amp,
            }
        )
    )


if __name__ == "__main__":
    main()
