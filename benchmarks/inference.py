"""Inference latency of UniInst R-50-FPN, eager and exported to ONNX Runtime, next to
torchvision's Mask R-CNN R-50-FPN.

Both models see the same pixels (a synthetic image of occluding shapes), batch 1, eval mode,
``torch.inference_mode()``. The weights are untrained and would produce almost no detection,
which skips the mask heads, so both are forced to run their full post-processing on 100
detections. UniInst keeps every location with a positive score (``score_thresh=0``: its fixed-size top-k
keeps the best 100). Mask R-CNN's box score threshold is set so that its best
``--maskrcnn-candidates`` (box, class) pairs (1000 by default) enter its per-class NMS, the
order of what a trained model's default threshold of 0.05 lets through. A threshold of 0
(``--maskrcnn-candidates 0``) would instead send every one of the 1000 proposals × 90
classes into NMS (softmax scores are never 0), a workload no trained model has, which makes
Mask R-CNN look far slower than it is.

ONNX Runtime runs the program ``uniinst export`` writes (the NMS-free forward with its masks at
the input's size), exported from the same weights, with as many intra-op threads as torch.
Each model's FLOPs (torch's FlopCounterMode, one eager run; the ONNX program does UniInst's
work) over its median time gives the rate it achieves.

The models run interleaved (A B C A B C ...) after warm-up and the medians are reported: on
a shared machine the ratios are far more stable than any absolute figure. The last line of
output is one JSON object with the results.

    python benchmarks/inference.py                        # CPU, torch's current thread count
    python benchmarks/inference.py --device cuda --amp    # GPU, fp16 autocast
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection import maskrcnn_resnet50_fpn

from uniinst.config import load_config
from uniinst.data.synthetic import generate_synthetic_coco
from uniinst.engine.export import INPUT_NAME, export_model
from uniinst.engine.inference_model import InferenceModel
from uniinst.modeling.uniinst import build_model

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "uniinst_R50_3x.yaml"
MAX_DETECTIONS = 100


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must look like HxW (e.g. 800x1216), got {text!r}") from None
    if h < 32 or w < 32:
        raise argparse.ArgumentTypeError(f"--size must be at least 32x32, got {text!r}")
    return h, w


def synthetic_image(height: int, width: int, *, seed: int = 0) -> torch.Tensor:
    """A deterministic uint8 ``[3, H, W]`` image of (up to) ten occluding shapes."""
    with tempfile.TemporaryDirectory() as tmp:
        generate_synthetic_coco(
            tmp,
            splits={"bench": 1},
            image_size=(height, width),
            num_classes=8,
            min_instances=10,
            max_instances=10,
            seed=seed,
        )
        pixels = np.asarray(Image.open(Path(tmp) / "bench" / "000001.jpg").convert("RGB"))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


def calibrate_box_threshold(model: nn.Module, inputs: list[torch.Tensor], candidates: int, amp: bool) -> float:
    """The box score threshold that lets Mask R-CNN's ``candidates`` best (box, class) pairs
    of ``inputs`` into its NMS."""
    captured: list[torch.Tensor] = []
    hook = model.roi_heads.box_predictor.register_forward_hook(lambda _m, _i, out: captured.append(out[0]))
    try:
        with torch.inference_mode(), torch.autocast(inputs[0].device.type, dtype=torch.float16, enabled=amp):
            model(inputs)
    finally:
        hook.remove()
    # Mask R-CNN's own scoring: softmax over the classes, background (column 0) dropped.
    scores = captured[0].float().softmax(-1)[:, 1:].flatten()
    kth = scores.topk(min(candidates, scores.numel())).values[-1]
    # The model keeps scores strictly above the threshold.
    return float(torch.nextafter(kth, kth.new_tensor(0.0)))


def onnx_runner(model: nn.Module, cfg, image: torch.Tensor, threads: int, folder: Path) -> Callable[[], int]:
    """ONNX Runtime running the exported program of ``model`` on ``image``; returns a callable
    that runs it once and gives its number of instances."""
    import onnxruntime as ort

    path = export_model(InferenceModel(model, cfg, None), folder / "uniinst.onnx", fmt="onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {INPUT_NAME: image.numpy()}
    return lambda: int((session.run(None, feed)[1] > 0).sum())


def count_flops(fn: Callable[[], object]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1000.0, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=10, help="timed runs of each model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of each model first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--amp", action="store_true", help="fp16 autocast (CUDA only)")
    parser.add_argument("--size", type=parse_size, default=(800, 1216), help="input HxW (default 800x1216)")
    parser.add_argument(
        "--maskrcnn-candidates",
        type=int,
        default=1000,
        help="(box, class) pairs Mask R-CNN sends into NMS (0: every pair, box_score_thresh=0)",
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="UniInst config")
    parser.add_argument(
        "--onnx", action=argparse.BooleanOptionalAction, default=True,
        help="also time the exported program in ONNX Runtime (CPU only)",
    )
    args = parser.parse_args()
    if args.iters < 1 or args.warmup < 0 or args.threads < 1 or args.maskrcnn_candidates < 0:
        parser.error("--iters and --threads must be >= 1, --warmup and --maskrcnn-candidates >= 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device} but CUDA is not available")
    if args.amp and device.type != "cuda":
        parser.error("--amp needs --device cuda")
    if args.onnx and device.type != "cpu":
        parser.error("--onnx times ONNX Runtime on the CPU: add --no-onnx with --device cuda")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    height, width = args.size
    image = synthetic_image(height, width)

    cfg = load_config(args.config, ["model.backbone.pretrained=false", "model.inference.score_thresh=0.0"])
    uniinst = build_model(cfg.model).eval().to(device)
    # min_size/max_size equal to the input's sides: Mask R-CNN keeps the input's resolution.
    maskrcnn = (
        maskrcnn_resnet50_fpn(
            weights=None,
            weights_backbone=None,
            box_score_thresh=0.0,
            box_detections_per_img=MAX_DETECTIONS,
            min_size=min(height, width),
            max_size=max(height, width),
        )
        .eval()
        .to(device)
    )

    pad_h, pad_w = -(-height // 32) * 32, -(-width // 32) * 32
    uniinst_input = torch.zeros((1, 3, pad_h, pad_w), dtype=torch.uint8)
    uniinst_input[0, :, :height, :width] = image
    uniinst_input = uniinst_input.to(device)
    maskrcnn_input = [(image.float() / 255.0).to(device)]
    sizes = [(height, width)]

    def run_uniinst() -> int:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=args.amp):
            return len(uniinst(uniinst_input, sizes, orig_sizes=sizes)[0])

    def run_maskrcnn() -> int:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=args.amp):
            return len(maskrcnn(maskrcnn_input)[0]["scores"])

    if args.maskrcnn_candidates > 0:
        maskrcnn.roi_heads.score_thresh = calibrate_box_threshold(
            maskrcnn, maskrcnn_input, args.maskrcnn_candidates, args.amp
        )

    runners = {"uniinst": run_uniinst, "maskrcnn": run_maskrcnn}
    flops = {"uniinst": count_flops(run_uniinst), "maskrcnn": count_flops(run_maskrcnn)}
    workdir = tempfile.TemporaryDirectory()
    if args.onnx:
        runners["uniinst_onnx"] = onnx_runner(uniinst, cfg, image, args.threads, Path(workdir.name))
        flops["uniinst_onnx"] = flops["uniinst"]
    detections = {}
    for _ in range(args.warmup):
        for name, fn in runners.items():
            detections[name] = time_once(fn, device)[1]
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.iters):
        for name, fn in runners.items():
            ms, detections[name] = time_once(fn, device)
            times[name].append(ms)

    workdir.cleanup()
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratio = medians["uniinst"] / medians["maskrcnn"]
    precision = "fp16 autocast" if args.amp else "fp32"
    print(f"input {height}x{width}, batch 1, {device}, {precision}, threads {args.threads}, torch {torch.__version__}")
    print(f"{'model':<30}{'median ms':>11}{'min ms':>9}{'max ms':>9}{'detections':>12}{'GFLOP':>8}{'GFLOP/s':>9}")
    labels = {
        "uniinst": "UniInst R-50-FPN", "maskrcnn": "Mask R-CNN R-50-FPN", "uniinst_onnx": "UniInst R-50-FPN, ONNX RT",
    }
    for name, t in times.items():
        gflop = flops[name] / 1e9
        print(
            f"{labels[name]:<30}{medians[name]:>11.1f}{min(t):>9.1f}{max(t):>9.1f}{detections[name]:>12d}"
            f"{gflop:>8.0f}{gflop / (medians[name] / 1000):>9.1f}"
        )
    print(
        f"Mask R-CNN box score threshold {maskrcnn.roi_heads.score_thresh:.6g} "
        f"({args.maskrcnn_candidates or 'all'} candidates into NMS)"
    )
    print(f"ratio UniInst / Mask R-CNN: {ratio:.3f}  (medians of {args.iters} interleaved runs)")
    result = {
        "uniinst_ms": round(medians["uniinst"], 2),
        "maskrcnn_ms": round(medians["maskrcnn"], 2),
        "ratio": round(ratio, 4),
        "gflop": {name: round(f / 1e9, 1) for name, f in flops.items()},
        "device": str(device),
        "threads": args.threads,
        "size": [height, width],
        "iters": args.iters,
        "amp": args.amp,
    }
    if args.onnx:
        onnx_ratio = medians["uniinst_onnx"] / medians["maskrcnn"]
        print(f"ratio UniInst ONNX Runtime / Mask R-CNN: {onnx_ratio:.3f}")
        result.update(uniinst_onnx_ms=round(medians["uniinst_onnx"], 2), onnx_ratio=round(onnx_ratio, 4))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
