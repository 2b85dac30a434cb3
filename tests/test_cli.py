"""The ``uniinst`` command as a user runs it."""

import json
import subprocess

import numpy as np
from PIL import Image

from conftest import CONFIGS, TINY
from uniinst.cli import main
from uniinst.config import load_config, to_dict
from uniinst.engine.checkpoint import save_checkpoint
from uniinst.evaluation.coco_eval import METRIC_KEYS
from uniinst.modeling.uniinst import build_model


def test_console_script_is_installed():
    out = subprocess.run(["uniinst", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("synth", "train", "evaluate", "predict", "quickstart"):
        assert command in out


def test_synth_writes_a_coco_dataset(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path), "--train", "3", "--val", "2", "--size", "96", "--occlusion", "heavy"]) == 0
    data = json.loads((tmp_path / "annotations" / "instances_train.json").read_text())
    assert len(data["images"]) == 3 and data["annotations"]
    assert len(list((tmp_path / "val").glob("*.jpg"))) == 2
    assert "overlap_fraction" in capsys.readouterr().out


def test_evaluate_scores_a_results_file(synth_data, tmp_path, capsys):
    gt = synth_data / "annotations" / "instances_val.json"
    anns = json.loads(gt.read_text())["annotations"]
    results = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"], "score": 1.0}
        for a in anns
    ]
    res_path = tmp_path / "results.json"
    res_path.write_text(json.dumps(results))
    out = tmp_path / "report"
    assert main(["evaluate", "--gt", str(gt), "--results", str(res_path), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(METRIC_KEYS) <= set(metrics)
    assert metrics["AP"] == 1.0
    printed = capsys.readouterr().out
    assert "| AP |" in printed and "100.0" in printed


def test_evaluate_rejects_a_malformed_results_file(synth_data, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"not": "a list"}))
    gt = synth_data / "annotations" / "instances_val.json"
    assert main(["evaluate", "--gt", str(gt), "--results", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "bad.json" in capsys.readouterr().err


def test_config_typo_is_reported_with_its_key(tmp_path, capsys):
    code = main(["train", "--config", str(CONFIGS / "synth_R18_uniinst.yaml"), "solver.max_itre=5"])
    assert code == 2
    assert "solver.max_itre" in capsys.readouterr().err


def test_train_then_evaluate_and_predict(synth_data, tmp_path, capsys):
    run = tmp_path / "run"
    args = [
        "train", "--config", str(CONFIGS / "synth_R18_uniinst.yaml"), "--output-dir", str(run), *TINY,
        "data.synthetic=false", "solver.max_iter=2",
        f"data.train.json={synth_data / 'annotations' / 'instances_train.json'}", f"data.train.images={synth_data / 'train'}",
        f"data.val.json={synth_data / 'annotations' / 'instances_val.json'}", f"data.val.images={synth_data / 'val'}",
    ]
    assert main(args) == 0
    assert "mask AP" in capsys.readouterr().out
    ckpt = run / "checkpoints" / "model_0000002.pt"
    assert ckpt.is_file()

    assert main(["evaluate", "--checkpoint", str(ckpt), "--out", str(tmp_path / "ev")]) == 0
    assert set(METRIC_KEYS) <= set(json.loads((tmp_path / "ev" / "metrics.json").read_text()))

    img = tmp_path / "in.jpg"
    Image.fromarray(np.full((70, 90, 3), 128, np.uint8)).save(img)
    out = tmp_path / "png"
    assert main(["predict", str(img), str(sorted((synth_data / "val").glob("*.jpg"))[0]), "--checkpoint", str(ckpt),
                 "--out", str(out), "--score-thresh", "0.0", "--draw"]) == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2
    with Image.open(out / "in.png") as im:
        assert im.size == (90, 70)
    first = json.loads((out / "predictions.jsonl").read_text().splitlines()[0])
    assert first["file"] == str(img) and (first["height"], first["width"]) == (70, 90)


def test_predict_names_an_unreadable_image(tmp_path, capsys):
    cfg = load_config(CONFIGS / "synth_R18_uniinst.yaml", TINY)
    ckpt = save_checkpoint({"model": build_model(cfg.model).state_dict(), "config": to_dict(cfg)}, tmp_path / "m.pt")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(["predict", str(broken), "--checkpoint", str(ckpt), "--out", str(tmp_path / "o")]) == 2
    assert "broken.jpg" in capsys.readouterr().err
