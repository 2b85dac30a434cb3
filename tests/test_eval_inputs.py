"""What evaluation refuses: malformed COCO results, and a model whose classes do not fit the ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config
from pycocotools import mask as mask_utils

from uniinst.cli import main
from uniinst.data.coco import CocoDataset
from uniinst.data.transforms import eval_transform
from uniinst.engine.local import train_local
from uniinst.evaluation.categories import label_to_category_ids, parse_label_map
from uniinst.evaluation.coco_eval import evaluate_segm
from uniinst.evaluation.coco_results import load_results, rle_string_runs
from uniinst.modeling.uniinst import build_model

HEIGHT, WIDTH = 480, 640


def _mask(y0: int, x0: int) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[y0 : y0 + 100, x0 : x0 + 150] = 1
    return mask


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


@pytest.fixture
def gt_json(tmp_path: Path) -> Path:
    """Image 42, 640x480 (WxH), with two objects of category 1."""
    anns = [
        {"id": i + 1, "image_id": 42, "category_id": 1, "segmentation": _rle(_mask(y, x)), "area": 15000.0,
         "bbox": [x, y, 150, 100], "iscrowd": 0}
        for i, (y, x) in enumerate([(10, 20), (250, 300)])
    ]
    data = {
        "images": [{"id": 42, "file_name": "a.jpg", "height": HEIGHT, "width": WIDTH}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "thing"}],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return path


def _perfect_results(gt_json: Path) -> list[dict]:
    anns = json.loads(gt_json.read_text())["annotations"]
    return [{"image_id": 42, "category_id": 1, "segmentation": a["segmentation"], "score": 0.9} for a in anns]


def _write(tmp_path: Path, results: list[dict]) -> Path:
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    return path


# --------------------------------------------------------------------------- COCO results


def test_result_of_another_size_than_its_image_is_rejected(gt_json, tmp_path):
    results = _perfect_results(gt_json)
    results[1]["segmentation"] = _rle(np.ones((10, 10), dtype=np.uint8))
    with pytest.raises(
        ValueError,
        match=r"results\.json: result 1: segmentation size \[10, 10\] does not match image 42, which is \[480, 640\]",
    ):
        evaluate_segm(gt_json, _write(tmp_path, results))


@pytest.mark.parametrize(
    "counts, reason",
    [
        ("garbage!!", "outside the RLE alphabet"),
        ("abc", "ends inside a number"),  # 'c' carries the continuation bit
        ("12", "cover 3 pixels"),  # two valid runs that do not fill the 480x640 mask
        ([5, 7], "cover 12 pixels, not the 307200"),
        ([307201, -1], "negative"),
        ({"a": 1}, "string or a list"),
    ],
)
def test_undecodable_counts_are_rejected(gt_json, tmp_path, counts, reason):
    results = _perfect_results(gt_json)
    results[1]["segmentation"] = {"size": [HEIGHT, WIDTH], "counts": counts}
    with pytest.raises(ValueError, match=rf"results\.json: result 1: segmentation counts .*{reason}"):
        evaluate_segm(gt_json, _write(tmp_path, results))


@pytest.mark.parametrize("score", ["0.9", None, True, float("nan"), float("inf"), [0.9]])
def test_score_that_is_not_a_finite_number_is_rejected(gt_json, score):
    results = _perfect_results(gt_json)
    results[0]["score"] = score
    with pytest.raises(ValueError, match=r"results: result 0: score .* is not a finite number"):
        evaluate_segm(gt_json, results)


def _runs(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE counts: column-major runs, starting with zeros."""
    flat = mask.flatten(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.r_[0, edges, flat.size]).tolist()
    return runs if flat[0] == 0 else [0, *runs]


def test_uncompressed_rle_results_are_scored(gt_json, tmp_path):
    results = [
        {"image_id": 42, "category_id": 1, "segmentation": {"size": [HEIGHT, WIDTH], "counts": _runs(_mask(y, x))},
         "score": 0.9}
        for y, x in [(10, 20), (250, 300)]
    ]
    path = _write(tmp_path, results)
    assert load_results(path) == results
    assert evaluate_segm(gt_json, path)["AP"] == pytest.approx(1.0)


def test_rle_string_runs_decode_as_pycocotools_encodes():
    rng = np.random.default_rng(0)
    for _ in range(50):
        mask = (rng.random((int(rng.integers(1, 40)), int(rng.integers(1, 40)))) < rng.random()).astype(np.uint8)
        assert rle_string_runs(mask_utils.encode(np.asfortranarray(mask))["counts"].decode()) == _runs(mask)


def test_cli_rejects_a_mis_sized_result_in_one_line(gt_json, tmp_path, capsys):
    results = _perfect_results(gt_json)
    results[1]["segmentation"] = _rle(np.ones((10, 10), dtype=np.uint8))
    path = _write(tmp_path, results)
    code = main(["evaluate", "--gt", str(gt_json), "--results", str(path), "--out", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        f"uniinst evaluate: error: {path}: result 1: segmentation size [10, 10] does not match image 42, "
        "which is [480, 640] (height, width)"
    ]
    assert not (tmp_path / "report" / "metrics.json").exists()


def test_cli_rejects_a_non_numeric_score_in_one_line(gt_json, tmp_path, capsys):
    results = _perfect_results(gt_json)
    results[1]["score"] = "high"
    path = _write(tmp_path, results)
    assert main(["evaluate", "--gt", str(gt_json), "--results", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    expected = f"uniinst evaluate: error: {path}: result 1: score 'high' is not a finite number"
    assert err.strip().splitlines() == [expected]


# --------------------------------------------------------------------------- model classes vs ground truth

SHAPES = ["circle", "square", "triangle", "ellipse"]
COCO_LIKE = [{"id": i, "name": f"class{i}"} for i in range(1, 77)] + [
    {"id": 100 + k, "name": name} for k, name in enumerate(SHAPES)
]


def test_names_map_labels_to_the_ground_truths_ids():
    assert label_to_category_ids(4, SHAPES, COCO_LIKE) == [100, 101, 102, 103]
    # Classes the ground truth lacks are dropped (a COCO model on OCHuman's person).
    assert label_to_category_ids(3, ["dog", "square", "cat"], COCO_LIKE) == [-1, 101, -1]


def test_unnamed_classes_map_in_id_order_only_when_they_are_as_many():
    cats = [{"id": 9, "name": "b"}, {"id": 4, "name": "a"}]
    assert label_to_category_ids(2, None, cats) == [4, 9]
    with pytest.raises(
        ValueError, match=r"model's 4 unnamed classes cannot be matched to GT\.json \(80 categories: class1, .*: pass a"
    ):
        label_to_category_ids(4, None, COCO_LIKE, source="GT.json")


def test_names_outside_the_ground_truth_are_refused():
    with pytest.raises(
        ValueError,
        match=r"none of the model's classes \(a, b, c, d\) is a category of GT\.json \(80 categories.*label map",
    ):
        label_to_category_ids(4, ["a", "b", "c", "d"], COCO_LIKE, source="GT.json")
    with pytest.raises(ValueError, match="4 classes but 2 class names"):
        label_to_category_ids(4, ["a", "b"], COCO_LIKE)


def test_label_map_must_cover_every_label_with_known_ids():
    assert label_to_category_ids(2, ["a", "b"], COCO_LIKE, label_map={0: 1, 1: 18}) == [1, 18]
    with pytest.raises(ValueError, match=r"leaves the model's label\(s\) 1 unmapped"):
        label_to_category_ids(2, None, COCO_LIKE, label_map={0: 1})
    with pytest.raises(ValueError, match=r"category id\(s\) 90, which are not in GT\.json"):
        label_to_category_ids(2, None, COCO_LIKE, label_map={0: 1, 1: 90}, source="GT.json")
    with pytest.raises(ValueError, match=r"label\(s\) 2, but the model has labels 0\.\.1"):
        label_to_category_ids(2, None, COCO_LIKE, label_map={0: 1, 1: 2, 2: 3})


def test_parse_label_map():
    assert parse_label_map("0=1,1=18") == {0: 1, 1: 18}
    assert parse_label_map(" 0 = 3 , 1=4") == {0: 3, 1: 4}
    for bad, message in [("0:1", "'0:1' is not LABEL=CATEGORY_ID"), ("a=1", "'a=1'"), ("", "''"),
                         ("0=1,0=2", "label 0 twice")]:
        with pytest.raises(ValueError, match=message):
            parse_label_map(bad)


def test_shard_evaluation_takes_the_same_mapping():
    from uniinst.data.shards import Manifest
    from uniinst.ray.evaluate import label_to_category

    manifest = Manifest(categories=COCO_LIKE, shards=[], num_images=0, num_annotations=0)
    with pytest.raises(ValueError, match=r"4 unnamed classes cannot be matched to s3://b/shards \(80 categories"):
        label_to_category(manifest, num_classes=4, source="s3://b/shards")
    assert label_to_category(manifest, num_classes=2, label_map={0: 100, 1: 5}) == [100, 5]


@pytest.fixture
def gt80(synth_data, tmp_path) -> Path:
    """The synthetic validation set with the 4 shapes among 80 categories, under other ids."""
    data = json.loads((synth_data / "annotations" / "instances_val.json").read_text())
    new_id = {c["id"]: 100 + SHAPES.index(c["name"]) for c in data["categories"]}
    data["categories"] = COCO_LIKE
    for ann in data["annotations"]:
        ann["category_id"] = new_id[ann["category_id"]]
    path = tmp_path / "gt80.json"
    path.write_text(json.dumps(data))
    return path


def test_evaluating_a_4_class_model_on_80_categories_needs_names_or_a_map(synth_data, gt80, tmp_path):
    from uniinst.evaluation.inference import evaluate_model

    cfg = tiny_config(synth_data, tmp_path / "run")
    model = build_model(cfg.model).eval()
    dataset = CocoDataset(gt80, synth_data / "val")
    kwargs = dict(transform=eval_transform(cfg))
    with pytest.raises(ValueError, match=r"4 unnamed classes cannot be matched to .*gt80\.json \(80 categories"):
        evaluate_model(model, dataset, tmp_path / "none", **kwargs)
    assert not (tmp_path / "none").exists()
    for name, how in [("names", {"class_names": SHAPES}), ("map", {"label_map": {0: 100, 1: 101, 2: 102, 3: 103}})]:
        metrics = evaluate_model(model, dataset, tmp_path / name, **how, **kwargs)
        assert 0.0 <= metrics["AP"] <= 1.0
        written = json.loads((tmp_path / name / "results.json").read_text())
        assert {r["category_id"] for r in written} <= {100, 101, 102, 103}


def test_cli_refuses_a_checkpoint_whose_classes_the_ground_truth_lacks(synth_data, gt80, tmp_path, capsys):
    # The case: a 4-class model scored against 80 categories none of which it names.
    data = json.loads(gt80.read_text())
    data["categories"] = [{"id": i, "name": f"class{i}"} for i in range(1, 81)]
    for ann in data["annotations"]:
        ann["category_id"] -= 99
    other = tmp_path / "other80.json"
    other.write_text(json.dumps(data))
    cfg = tiny_config(synth_data, tmp_path / "run", "solver.max_iter=1", "data.val.json=")
    checkpoint = train_local(cfg).checkpoint
    capsys.readouterr()
    args = ["evaluate", "--checkpoint", str(checkpoint), "--gt", str(other), "--images", str(synth_data / "val"),
            "--out", str(tmp_path / "ev"), "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "none of the model's classes (circle, square" in err and "80 categories" in err
    assert not (tmp_path / "ev").exists()
    assert main([*args, "--label-map", "0=1,1=2,2=3,3=4"]) == 0
    assert {r["category_id"] for r in json.loads((tmp_path / "ev" / "results.json").read_text())} <= {1, 2, 3, 4}
