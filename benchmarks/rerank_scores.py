"""What the re-ranking head adds at inference, on the same weights (the Table 5 finding).

For each UniInst checkpoint, scores fresh synthetic val images twice: with the spec's score
σ(cls)·σ(filter)·clamp(iou_pred, 0, 1) and with σ(cls)·σ(filter) alone, so that the
difference is the ranking by predicted mask IoU and nothing the head's training changed in the
shared tower; both also with every class taken as one (class-agnostic AP). For the kept
predictions of the full score it also reports how well each factor ranks the predicted masks
by their real quality, the mask IoU with the best-overlapping
ground-truth instance (Spearman's ρ; also in the top tenth by σ(cls)·σ(filter)), the mean
|iou_pred − IoU|, and the median over instances of the score of an instance's second-best
same-class prediction (IoU >= 0.5) over its best's.

    python benchmarks/rerank_scores.py RUN1/state.pt RUN2/state.pt              # the synth suite's val
    python benchmarks/rerank_scores.py RUN1/state.pt RUN2/state.pt --split heavy --occlusion heavy --seed 1001
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy.stats import spearmanr

from uniinst.data.coco import CocoDataset
from uniinst.data.dataset import InstanceSegDataset, build_eval_loader
from uniinst.data.synthetic import generate_synthetic_coco
from uniinst.engine.inference_model import InferenceModel, load_model_for_inference
from uniinst.evaluation.coco_eval import evaluate_segm
from uniinst.evaluation.coco_results import instances_to_coco_results
from uniinst.modeling.nms import mask_ious
from uniinst.modeling.postprocess import paste_masks, top_candidates


def class_agnostic_ap(gt_json: Path, results: list[dict]) -> float:
    """Mask AP (%) with every class taken as one (pycocotools' ``useCats = 0``): what the
    ranking is worth on mask quality alone."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_json))
        evaluator = COCOeval(gt, gt.loadRes(results), iouType="segm")
        evaluator.params.useCats = 0
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return 100.0 * float(evaluator.stats[0])


class RerankProbe:
    """Runs one checkpoint's model over a dataset, collecting both scorings' COCO results and,
    per kept prediction, (iou_pred, σ(cls)·σ(filter), real mask IoU)."""

    def __init__(self, loaded: InferenceModel) -> None:
        self.loaded, self.model = loaded, loaded.model
        if self.model.head.iou_pred is None:
            raise SystemExit("rerank_scores: the checkpoint's model has no re-ranking head (model.rerank=false)")
        self.results: dict[str, list[dict]] = {"cls·filter·iou": [], "cls·filter": []}
        self.iou_pred: list[float] = []
        self.joint: list[float] = []
        self.quality: list[float] = []
        # Per instance with two or more same-class predictions at IoU >= 0.5: the second's score over the first's.
        self.runner_up: list[float] = []

    @torch.inference_mode()
    def run(self, dataset: CocoDataset) -> None:
        images = InstanceSegDataset(dataset, self.loaded.transform)
        for start, batch in zip(range(0, len(dataset), 8), build_eval_loader(images, batch_size=8)):
            out, mask_feats, sizes = self.model.features(batch.images, batch.image_sizes)
            for name, scored in (("cls·filter·iou", out), ("cls·filter", dataclasses.replace(out, iou_preds=None))):
                found = self.model.postprocess(scored, mask_feats, sizes, batch.image_sizes, batch.orig_sizes)
                for image_id, inst in zip(batch.image_ids, found):
                    self.results[name].extend(instances_to_coco_results(inst, image_id, self.loaded.category_ids))
            scores = self.model.scores(out)
            for b in range(len(batch)):
                record = dataset.load(start + b)
                self._collect(scores[b], out, mask_feats, sizes, batch, b, record.masks, record.labels)

    def _collect(self, scores, out, mask_feats, sizes, batch, b: int, gt: np.ndarray, gt_labels: np.ndarray) -> None:
        m = self.model
        loc_idx, labels, top = top_candidates(
            list(scores.split(sizes)), topk_per_level=m.topk_per_level, max_detections=m.max_detections
        )
        keep = top > m.score_thresh
        _, _, logits = m.candidates(scores, out, mask_feats, sizes, b)
        masks = paste_masks(
            logits[keep].float(), image_size=tuple(batch.image_sizes[b]), orig_size=tuple(batch.orig_sizes[b]),
            mask_out_stride=m.mask_head.mask_out_stride, threshold=m.mask_thresh,
        )
        loc, lab = loc_idx[keep], labels[keep]
        self.iou_pred += out.iou_preds[b, loc].clamp(0.0, 1.0).tolist()
        self.joint += (out.cls_logits[b, loc, lab].sigmoid() * out.filters[b, loc].sigmoid()).tolist()
        if len(gt) == 0 or len(masks) == 0:
            self.quality += [0.0] * len(masks)
            return
        ious = mask_ious(masks, torch.from_numpy(gt)).numpy()
        self.quality += ious.max(axis=1).tolist()
        kept_scores, kept_labels = top[keep].numpy(), lab.numpy()
        for g, label in enumerate(gt_labels):
            hits = np.sort(kept_scores[(ious[:, g] >= 0.5) & (kept_labels == label)])[::-1]
            if len(hits) >= 2:
                self.runner_up.append(float(hits[1] / hits[0]))

    def summary(self, gt_json: Path) -> dict[str, float]:
        row = {name: 100.0 * evaluate_segm(gt_json, res)["AP"] for name, res in self.results.items()}
        row.update({f"{name} agnostic": class_agnostic_ap(gt_json, res) for name, res in self.results.items()})
        quality = np.asarray(self.quality)
        row["rho_iou_pred"] = float(spearmanr(self.iou_pred, quality).statistic)
        row["rho_cls_filter"] = float(spearmanr(self.joint, quality).statistic)
        row["iou_pred_mae"] = float(np.abs(np.asarray(self.iou_pred) - quality).mean())
        joint = np.asarray(self.joint)
        top = joint >= np.quantile(joint, 0.9)
        row["rho_iou_pred_top10"] = float(spearmanr(np.asarray(self.iou_pred)[top], quality[top]).statistic)
        row["rho_cls_filter_top10"] = float(spearmanr(joint[top], quality[top]).statistic)
        row["top10_iou_ge_0.5"] = float((quality[top] >= 0.5).mean())
        row["runner_up_ratio"] = float(np.median(self.runner_up))
        row["kept"] = len(quality)
        return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="UniInst checkpoints trained with model.rerank=true")
    parser.add_argument("--images", type=int, default=100, help="val images to generate (the suite's val: 100)")
    parser.add_argument("--seed", type=int, default=1000, help="the generator's seed (the suite's val: 1000)")
    parser.add_argument("--occlusion", choices=("normal", "heavy"), default="normal")
    parser.add_argument(
        "--split", default="val", help="the split's name, which seeds its images (the suite's: val; heavy with "
        "--occlusion heavy --seed 1001)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="uniinst-rerank-") as tmp:
        for checkpoint in args.checkpoints:
            loaded = load_model_for_inference(checkpoint, device=torch.device("cpu"))
            data = loaded.cfg.data
            paths = generate_synthetic_coco(
                Path(tmp) / "data", splits={args.split: args.images}, image_size=data.synthetic_image_size,
                num_classes=loaded.cfg.model.num_classes, shapes=data.synthetic_shapes,
                occlusion=args.occlusion, seed=args.seed,
            )
            dataset = CocoDataset(paths[args.split], Path(tmp) / "data" / args.split)
            probe = RerankProbe(loaded)
            probe.run(dataset)
            rows.append(probe.summary(paths[args.split]))
            print(f"{checkpoint}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in rows[-1].items()), flush=True)
    keys = [k for k in rows[0] if k != "kept"]
    print("\nmean ± std over checkpoints:")
    for k in keys:
        values = [r[k] for r in rows]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"  {k:16s} {statistics.fmean(values):7.3f} ± {std:.3f}")
    diffs = [r["cls·filter·iou"] - r["cls·filter"] for r in rows]
    print(f"  AP gained by the iou factor at inference: {statistics.fmean(diffs):+.2f} (per checkpoint: "
          + ", ".join(f"{d:+.2f}" for d in diffs) + ")")


if __name__ == "__main__":
    main()
