"""COCO results, pycocotools segm evaluation, reports and drawing predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from uniinst.evaluation.coco_eval import METRIC_KEYS, evaluate_segm, format_table, write_report
from uniinst.evaluation.coco_results import instances_to_coco_results, load_results, save_results
from uniinst.structures import Instances
from uniinst.visualize import (
    draw_instances,
    enlarge,
    instance_color,
    place_label,
    same_mask_groups,
    save_visualization,
)

CAT_IDS = [3, 7]  # contiguous label 0 -> category 3, 1 -> category 7
COCO_TINY = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_tiny"


def _rect_polygon(x1: int, y1: int, x2: int, y2: int) -> list[list[float]]:
    return [[x1, y1, x2, y1, x2, y2, x1, y2]]


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (column-major runs starting with zeros)."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


@pytest.fixture
def gt_json(tmp_path: Path) -> Path:
    """Two images, two categories, polygon and RLE instances; no info/licenses keys."""
    blob = np.zeros((40, 50), dtype=bool)
    blob[5:15, 30:45] = True
    blob[10:20, 35:40] = True
    anns = [
        (1, 3, _rect_polygon(2, 2, 20, 14)),
        (1, 7, _uncompressed_rle(blob)),
        (1, 3, _rect_polygon(5, 22, 25, 38)),
        (2, 7, _rect_polygon(0, 0, 12, 10)),
        (2, 3, _rect_polygon(14, 12, 28, 28)),
    ]
    dataset = {
        "images": [
            {"id": 1, "width": 50, "height": 40, "file_name": "a.jpg"},
            {"id": 2, "width": 30, "height": 30, "file_name": "b.jpg"},
        ],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": [],
    }
    for ann_id, (image_id, cat, seg) in enumerate(anns, start=1):
        img = dataset["images"][image_id - 1]
        rles = mask_util.frPyObjects(seg, img["height"], img["width"])
        rle = mask_util.merge(rles) if isinstance(rles, list) else rles
        dataset["annotations"].append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": cat,
                "segmentation": seg,
                "area": float(mask_util.area(rle)),
                "bbox": [float(v) for v in mask_util.toBbox(rle)],
                "iscrowd": 0,
            }
        )
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(dataset))
    return path


def _gt_masks(gt_json: Path) -> tuple[COCO, dict[int, list[dict]]]:
    coco = COCO(str(gt_json))
    per_image = {img_id: coco.loadAnns(coco.getAnnIds(imgIds=[img_id])) for img_id in coco.getImgIds()}
    return coco, per_image


def _gt_instances(coco: COCO, anns: list[dict], shift: int = 0) -> Instances:
    masks = torch.from_numpy(np.stack([coco.annToMask(a) for a in anns])).bool()
    if shift:
        masks = torch.roll(masks, shifts=(shift, shift), dims=(1, 2))
    labels = torch.tensor([CAT_IDS.index(a["category_id"]) for a in anns])
    return Instances(masks=masks, scores=torch.ones(len(anns)), labels=labels)


def _results(gt_json: Path, shift: int = 0) -> list[dict]:
    coco, per_image = _gt_masks(gt_json)
    results = []
    for img_id, anns in per_image.items():
        results += instances_to_coco_results(_gt_instances(coco, anns, shift), img_id, CAT_IDS)
    return results


def test_perfect_predictions_give_ap_one(gt_json):
    metrics = evaluate_segm(gt_json, _results(gt_json))
    assert set(metrics) == set(METRIC_KEYS)
    for key in ("AP", "AP50", "AP75", "APs", "AR10", "AR100"):
        assert metrics[key] == pytest.approx(1.0), key
    # AR1 keeps one detection per image and category: category 3 has two objects in image 1,
    # so it recalls 2 of its 3 objects, category 7 both of its 2.
    assert metrics["AR1"] == pytest.approx((2 / 3 + 1) / 2)
    # Every object is small (< 32² pixels): pycocotools reports the empty buckets as -1.
    assert metrics["APm"] == -1 and metrics["APl"] == -1


def test_results_and_gt_as_objects(gt_json):
    coco = COCO(str(gt_json))
    metrics = evaluate_segm(coco, _results(gt_json), image_ids=[2], category_ids=[3])
    assert metrics["AP"] == pytest.approx(1.0)


def test_empty_results_give_zeros(gt_json):
    assert evaluate_segm(gt_json, []) == {k: 0.0 for k in METRIC_KEYS}


def test_unknown_image_id_is_rejected(gt_json):
    results = _results(gt_json)
    results[0] = dict(results[0], image_id=999)
    with pytest.raises(ValueError, match="999"):
        evaluate_segm(gt_json, results)


def test_bad_ground_truth_file_is_named(tmp_path):
    bad = tmp_path / "not_coco.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match=r"not_coco\.json.*annotations"):
        evaluate_segm(bad, [])


def test_shifted_predictions_give_partial_ap(gt_json):
    metrics = evaluate_segm(gt_json, _results(gt_json, shift=3))
    assert 0.0 < metrics["AP"] < 1.0
    assert metrics["AP50"] > metrics["AP75"]


def test_round_trip_instances_results_file_evaluation(gt_json, tmp_path):
    coco, per_image = _gt_masks(gt_json)
    inst = _gt_instances(coco, per_image[1])
    results = instances_to_coco_results(inst, 1, CAT_IDS)
    assert [r["category_id"] for r in results] == [3, 7, 3]
    first = results[0]
    assert isinstance(first["segmentation"]["counts"], str)
    assert first["segmentation"]["size"] == [40, 50]
    assert first["bbox"] == [2.0, 2.0, 18.0, 12.0]
    decoded = mask_util.decode({"size": [40, 50], "counts": first["segmentation"]["counts"].encode()})
    assert np.array_equal(decoded.astype(bool), inst.masks[0].numpy())

    results += instances_to_coco_results(_gt_instances(coco, per_image[2]), 2, CAT_IDS)
    path = save_results(results, tmp_path / "out" / "results.json")
    loaded = load_results(path)
    assert loaded == results
    assert evaluate_segm(gt_json, path)["AP"] == pytest.approx(1.0)
    assert evaluate_segm(gt_json, loaded)["AP"] == pytest.approx(1.0)
    assert loaded == results  # evaluation leaves the caller's dicts alone


def test_empty_instances_give_no_results():
    empty = Instances(
        masks=torch.zeros(0, 5, 5, dtype=torch.bool), scores=torch.zeros(0), labels=torch.zeros(0, dtype=torch.long)
    )
    assert instances_to_coco_results(empty, 1, CAT_IDS) == []


def test_malformed_results_file_names_the_file(tmp_path):
    not_a_list = tmp_path / "dict.json"
    not_a_list.write_text(json.dumps({"image_id": 1}))
    with pytest.raises(ValueError, match="dict.json"):
        load_results(not_a_list)
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps([{"image_id": 1, "category_id": 3, "score": 0.5}]))
    with pytest.raises(ValueError, match=r"missing\.json.*segmentation"):
        load_results(missing)


@pytest.mark.skipif(not COCO_TINY.exists(), reason="coco_tiny not available")
def test_coco_tiny_gt_as_results_scores_near_one():
    gt_path = COCO_TINY / "annotations" / "instances_val2017.json"
    coco = COCO(str(gt_path))
    results = []
    for ann in coco.dataset["annotations"]:
        if ann["iscrowd"]:
            continue
        rle = coco.annToRLE(ann)
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                "score": 1.0,
            }
        )
    metrics = evaluate_segm(gt_path, results)
    assert metrics["AP"] > 0.99
    assert metrics["AR100"] > 0.99


def test_format_table_and_write_report(tmp_path):
    metrics = {k: 0.1 * i for i, k in enumerate(METRIC_KEYS)}
    metrics["APl"] = -1.0
    metrics["AP"] = 0.3456
    table = format_table(metrics)
    header, rule, row = table.splitlines()
    assert header.strip("| ").split(" | ") == list(METRIC_KEYS)
    assert rule.count("---") == len(METRIC_KEYS)
    cells = row.strip("| ").split(" | ")
    assert cells[0] == "34.6" and cells[1] == "10.0" and cells[METRIC_KEYS.index("APl")] == "n/a"

    json_path, md_path = write_report(metrics, tmp_path / "report", extra={"iteration": 1200})
    saved = json.loads(json_path.read_text())
    assert all(saved[k] == pytest.approx(metrics[k]) for k in METRIC_KEYS)
    assert saved["extra"] == {"iteration": 1200}
    md = md_path.read_text()
    assert table in md and "iteration" in md


def _drawing_case() -> tuple[np.ndarray, Instances]:
    image = np.full((64, 64, 3), 100, dtype=np.uint8)
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 30:60, 20:60] = True
    masks[1, 0:10, 50:60] = True  # below the score threshold: not drawn
    return image, Instances(masks=masks, scores=torch.tensor([0.9, 0.1]), labels=torch.tensor([1, 0]))


def test_draw_instances_marks_only_the_masks():
    image, inst = _drawing_case()
    out = draw_instances(image, inst, ["cat", "dog"], score_thresh=0.3, alpha=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    color = np.array(instance_color(0))
    # Inside the mask, away from the label: the blend of grey and the colour.
    assert np.array_equal(out[55, 40], np.rint(0.5 * 100 + 0.5 * color))
    assert np.array_equal(out[59, 40], color)  # contour
    assert np.array_equal(out[:20, :20], image[:20, :20])
    assert np.array_equal(out[0:10, 50:60], image[0:10, 50:60])
    assert not np.array_equal(out[30:42, 20:40], np.full((12, 20, 3), out[55, 40]))  # the label text
    assert np.array_equal(image, np.full((64, 64, 3), 100, dtype=np.uint8))  # input untouched


def test_labels_of_masks_sharing_a_corner_are_stacked_not_overprinted():
    assert place_label((10, 5, 60, 15), []) == (10, 5, 60, 15)
    placed = [(10, 5, 60, 15), (0, 15, 30, 25)]
    assert place_label((20, 8, 50, 18), placed) == (20, 25, 50, 35)  # below both, which it would cover
    assert place_label((70, 5, 90, 15), placed) == (70, 5, 90, 15)  # beside them: stays
    image = np.full((64, 96, 3), 100, dtype=np.uint8)
    masks = torch.zeros(3, 64, 96, dtype=torch.bool)
    masks[0, 20:60, 10:80] = True
    masks[1, 20:40, 10:50] = True  # another mask with the same top-left corner: labels at (10, 20)
    masks[2] = masks[0]  # the first mask's location scored for a second class
    inst = Instances(masks=masks, scores=torch.tensor([0.6, 0.5, 0.4]), labels=torch.tensor([0, 1, 1]))
    assert same_mask_groups(masks.numpy(), inst.scores.numpy(), 0.3) == [[1], [0, 2]]
    out = draw_instances(image, inst, ["cat", "dog"])
    black_rows = np.flatnonzero((out[:, 12] == 0).all(axis=1))
    # Two label backgrounds one under the other (about 10 rows each), not three, nor overprinted.
    assert 20 <= black_rows.min() <= 24 and 16 <= black_rows.max() - black_rows.min() <= 24
    alone = draw_instances(image, Instances(masks=masks, scores=torch.tensor([0.6, 0.5, 0.2]), labels=inst.labels),
                           ["cat", "dog"])

    def top_label_width(drawn: np.ndarray) -> int:
        return int((drawn[20:32] == 0).all(axis=2).sum(axis=1).max())

    assert top_label_width(out) >= top_label_width(alone) + 20  # "cat 0.60 / dog 0.40" against "cat 0.60"


def test_save_visualization_writes_png(tmp_path):
    image, inst = _drawing_case()
    path = save_visualization(image, inst, ["cat", "dog"], tmp_path / "vis" / "pred.png")
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert np.array_equal(np.asarray(im.convert("RGB")), draw_instances(image, inst, ["cat", "dog"]))


def test_small_images_are_drawn_enlarged_with_their_masks_pixel_for_pixel(tmp_path):
    image, inst = _drawing_case()
    image[5, 7] = (1, 2, 3)
    big, big_inst = enlarge(image, inst, min_side=150)  # 64 px: 3x is the smallest factor reaching 150
    assert big.shape == (192, 192, 3) and big_inst.masks.shape == (2, 192, 192)
    assert np.array_equal(big[15:18, 21:24], np.broadcast_to(np.array([1, 2, 3], dtype=np.uint8), (3, 3, 3)))
    assert torch.equal(big_inst.masks[:, ::3, ::3], inst.masks)
    assert int(big_inst.masks[0].sum()) == 9 * int(inst.masks[0].sum())
    path = save_visualization(image, inst, ["cat", "dog"], tmp_path / "pred.png", min_side=150)
    with Image.open(path) as im:
        assert im.size == (192, 192)
        assert np.array_equal(np.asarray(im.convert("RGB")), draw_instances(big, big_inst, ["cat", "dog"]))
    same, _ = enlarge(image, inst, min_side=64)
    assert same is image
