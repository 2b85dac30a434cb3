"""What a synthetic-data checkpoint's drawings show: classes named right, and the precision and
recall of the predictions a drawing at each score threshold keeps.

The val images are generated again from the checkpoint's own config (its seed, size and
shapes), so for the quickstart's checkpoint they are the images it evaluated on. An instance
is *found* when some prediction covers it at mask IoU > 0.5, *named right* when the
best-scoring of those has its class (also per class and size: visible area under 300, 300 to
900, 900 px or more). For a threshold t, the predictions scoring >= t are
matched greedily, best score first, to unmatched instances of their class at IoU >= 0.5:
precision is the matched share of them, recall the matched share of the instances.

    python benchmarks/drawn_predictions.py outputs/quickstart/checkpoint_0001200/state.pt
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from uniinst.data.coco import CocoDataset
from uniinst.data.dataset import InstanceSegDataset, build_eval_loader
from uniinst.data.synthetic import generate_synthetic_coco
from uniinst.engine.inference_model import InferenceModel, load_model_for_inference
from uniinst.modeling.nms import mask_ious
from uniinst.structures import Instances

THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)


def size_name(area: float) -> str:
    return "small" if area < 300 else ("medium" if area < 900 else "large")


@dataclass
class DrawingTally:
    class_names: list[str]
    instances: int = 0
    found: int = 0
    named_right: int = 0
    scores: list[float] = field(default_factory=list)
    matched: list[bool] = field(default_factory=list)
    # (class, size) -> [instances, found, named right]
    by_class_size: dict[tuple[str, str], list[int]] = field(default_factory=dict)

    def add(self, inst: Instances, gt: np.ndarray, gt_labels: np.ndarray) -> None:
        self.instances += len(gt)
        cells = [self.by_class_size.setdefault((self.class_names[label], size_name(mask.sum())), [0, 0, 0])
                 for mask, label in zip(gt, gt_labels)]
        for cell in cells:
            cell[0] += 1
        if len(inst) == 0 or len(gt) == 0:
            self.scores += inst.scores.tolist()
            self.matched += [False] * len(inst)
            return
        ious = mask_ious(inst.masks, torch.from_numpy(gt))
        for g, label in enumerate(gt_labels):
            hits = torch.nonzero(ious[:, g] > 0.5).squeeze(1)
            if len(hits):
                right = int(inst.labels[hits[inst.scores[hits].argmax()]]) == int(label)
                self.found += 1
                self.named_right += right
                cells[g][1] += 1
                cells[g][2] += right
        taken: set[int] = set()
        for i in inst.scores.argsort(descending=True).tolist():
            free = [g for g in range(len(gt)) if g not in taken and int(gt_labels[g]) == int(inst.labels[i])
                    and ious[i, g] >= 0.5]
            if free:
                taken.add(max(free, key=lambda g: float(ious[i, g])))
            self.scores.append(float(inst.scores[i]))
            self.matched.append(bool(free))

    def lines(self, images: int) -> list[str]:
        out = [f"{self.instances} instances in {images} images: {self.found} found (mask IoU > 0.5), "
               f"{self.named_right} of them named right ({100 * self.named_right / max(self.found, 1):.0f} %)"]
        scores, matched = np.asarray(self.scores), np.asarray(self.matched, dtype=bool)
        for (name, size), (n, found, right) in sorted(self.by_class_size.items()):
            out.append(f"  {name} {size}: {n} instances, {found} found, {right} named right")
        for t in THRESHOLDS:
            keep = scores >= t
            precision = matched[keep].mean() if keep.any() else float("nan")
            out.append(f"  drawn at score >= {t}: {keep.sum() / images:.1f} per image, precision {precision:.2f}, "
                       f"recall {matched[keep].sum() / max(self.instances, 1):.2f}")
        return out


def val_split(loaded: InferenceModel, out_dir: Path) -> CocoDataset:
    cfg = loaded.cfg
    d = cfg.data
    paths = generate_synthetic_coco(
        out_dir, splits={"val": d.synthetic_val_images}, image_size=d.synthetic_image_size,
        num_classes=cfg.model.num_classes, shapes=d.synthetic_shapes, seed=cfg.train.seed,
    )
    return CocoDataset(paths["val"], out_dir / "val")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint trained on the built-in synthetic data")
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_model_for_inference(args.checkpoint, device=torch.device("cpu"))
    tally = DrawingTally(loaded.label_names)
    with tempfile.TemporaryDirectory(prefix="uniinst-drawn-") as tmp:
        dataset = val_split(loaded, Path(tmp))
        loader = build_eval_loader(InstanceSegDataset(dataset, loaded.transform), batch_size=8)
        for start, batch in zip(range(0, len(dataset), 8), loader):
            for b, inst in enumerate(loaded.predict(batch)):
                record = dataset.load(start + b)
                tally.add(inst, record.masks, record.labels)
        print("\n".join(tally.lines(len(dataset))))


if __name__ == "__main__":
    main()
