"""Bad input at the command line: every fault gets one clear line and exit code 2, applies
what the user asked for, and leaves a run's files as they were."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CONFIGS, TINY
from uniinst.cli import main
from uniinst.config import ConfigError, load_config
from uniinst.engine.checkpoint import load_checkpoint
from uniinst.engine.metrics import read_metrics


def _train_args(synth_data, run, *extra):
    return [
        "train", "--config", str(CONFIGS / "synth_R18_uniinst.yaml"), "--output-dir", str(run), *TINY,
        "data.synthetic=false",
        f"data.train.json={synth_data / 'annotations' / 'instances_train.json'}", f"data.train.images={synth_data / 'train'}",
        f"data.val.json={synth_data / 'annotations' / 'instances_val.json'}", f"data.val.images={synth_data / 'val'}",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(synth_data, tmp_path_factory):
    """A run trained for 2 iterations and its final checkpoint."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(_train_args(synth_data, run, "solver.max_iter=2")) == 0
    return run / "checkpoints" / "model_0000002.pt"


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "nothing on stderr"
    assert not any("Traceback" in line for line in err), "\n".join(err)
    return err[-1]


def _tree(folder):
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- overrides reach the stored config


def test_evaluate_applies_overrides_to_the_checkpoints_config(trained, tmp_path, capsys):
    out = tmp_path / "ev"
    overrides = ["model.inference.score_thresh=0", "model.inference.max_detections=1"]
    assert main(["evaluate", "--checkpoint", str(trained), "--out", str(out), *overrides]) == 0
    results = json.loads((out / "results.json").read_text())
    per_image = np.bincount([r["image_id"] for r in results])
    assert results and per_image.max() == 1


def test_evaluate_rejects_an_invalid_override_without_config(trained, tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(trained), "--out", str(tmp_path / "ev"), "model.inference.nms=bogus"]) == 2
    line = _error_line(capsys)
    assert "model.inference.nms" in line and "bogus" in line
    assert not (tmp_path / "ev").exists()


def test_predict_takes_overrides_positionally(trained, synth_data, tmp_path, capsys):
    image = str(sorted((synth_data / "val").glob("*.jpg"))[0])
    common = ["--checkpoint", str(trained), "--out", str(tmp_path / "png"), "--score-thresh", "0"]
    assert main(["predict", image, *common, "model.inference.score_thresh=0", "model.inference.max_detections=1"]) == 0
    assert "1 of 1 images predicted, 1 instances" in capsys.readouterr().out
    (line,) = (tmp_path / "png" / "predictions.jsonl").read_text().splitlines()
    assert len(json.loads(line)["instances"]) == 1
    assert main(["predict", image, *common, "model.inference.score_thresh=1.5"]) == 2
    assert "model.inference.score_thresh" in _error_line(capsys)


# --------------------------------------------------------------------------- checkpoints that do not fit


def test_a_failed_resume_leaves_the_run_untouched(synth_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_train_args(synth_data, run, "solver.max_iter=2", "data.val.json=")) == 0
    before = _tree(run)
    assert main(_train_args(synth_data, run, "solver.max_iter=4", "data.val.json=", "model.fpn_channels=64")) == 2
    line = _error_line(capsys)
    assert "model_0000002.pt" in line and "does not fit" in line and "fpn" in line
    assert _tree(run) == before


def test_evaluate_names_a_checkpoint_of_another_class_count(trained, tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(trained), "--out", str(tmp_path / "ev"), "model.num_classes=6"]) == 2
    line = _error_line(capsys)
    assert str(trained) in line and "cls_logits" in line and "[6," in line


def test_a_plain_state_dict_needs_a_config_and_then_works(trained, tmp_path, capsys):
    plain = tmp_path / "weights.pt"
    torch.save(load_checkpoint(trained)["model"], plain)
    assert main(["evaluate", "--checkpoint", str(plain), "--out", str(tmp_path / "ev")]) == 2
    assert "holds no config: pass --config" in _error_line(capsys)
    config = tmp_path / "config.yaml"
    config.write_bytes((trained.parents[1] / "config.yaml").read_bytes())
    assert main(["evaluate", "--checkpoint", str(plain), "--config", str(config), "--out", str(tmp_path / "ev")]) == 0


def test_a_file_that_is_no_checkpoint_is_named(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    torch.save({"step": 3, "notes": "x"}, junk)
    assert main(["evaluate", "--checkpoint", str(junk), "--out", str(tmp_path / "ev")]) == 2
    assert f"{junk}: not a model checkpoint" in _error_line(capsys)


# --------------------------------------------------------------------------- credentials


def test_credentials_in_an_endpoint_url_are_refused_and_never_printed(tmp_path, capsys):
    args = ["prepare", "--json", "s3://bucket/a.json", "--images", "s3://bucket/images", "--out", str(tmp_path / "o"),
            "--endpoint-url", "http://AKIAEXAMPLE:hunter2secret@127.0.0.1:9"]
    assert main(args) == 2
    line = _error_line(capsys)
    assert "must not carry credentials" in line
    assert "hunter2secret" not in line and "AKIAEXAMPLE" not in line
    with pytest.raises(ConfigError, match="data.endpoint_url must not carry credentials"):
        load_config(None, ["data.endpoint_url=http://user:pw@minio:9000"])


def test_a_secret_in_a_uri_never_reaches_stderr(s3_server, s3_bucket, tmp_path, capsys):
    bucket = s3_bucket.removeprefix("s3://")
    secret_uri = f"s3://AKIAEXAMPLE:wJalrXUtnFEMI@{bucket}/annotations/missing.json"
    args = ["prepare", "--json", secret_uri, "--images", f"s3://{bucket}/images", "--out", str(tmp_path / "o"),
            "--endpoint-url", s3_server, "-v"]
    assert main(args[:-1]) == 2
    err = capsys.readouterr().err
    assert err.strip() and "wJalrXUtnFEMI" not in err and "AKIAEXAMPLE" not in err


# --------------------------------------------------------------------------- leftovers of a crash


def test_a_resume_removes_save_leftovers_and_redone_metric_rows(synth_data, tmp_path):
    run = tmp_path / "run"
    common = ("train.checkpoint_period=2", "train.keep_checkpoints=10")
    assert main(_train_args(synth_data, run, "solver.max_iter=3", *common)) == 0
    # As if killed after iteration 3's metrics but before its checkpoint was renamed into place.
    (run / "checkpoints" / "model_0000003.pt").rename(run / "checkpoints" / ".model_0000003.pt.k2j4.tmp")
    (run / ".model_best.pt.x8a1.tmp").write_bytes(b"partial")
    assert main(_train_args(synth_data, run, "solver.max_iter=4", *common)) == 0
    assert not list(run.rglob("*.tmp"))
    rows = read_metrics(run / "metrics.jsonl")
    train_iters = [r["iteration"] for r in rows if "train/loss" in r]
    assert train_iters == [1, 2, 3, 4]
    assert [r["iteration"] for r in rows if "val/AP" in r] == [4]


# --------------------------------------------------------------------------- values out of range


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.inference.score_thresh=1.5", "model.inference.score_thresh"),
        ("model.head.num_convs=-1", "model.head.num_convs"),
        ("train.log_period=-5", "train.log_period"),
        ("solver.base_lr=-0.01", "solver.base_lr"),
        ("model.max_filter.kernel=4", "model.max_filter.kernel"),
        ("data.flip_prob=2", "data.flip_prob"),
    ],
)
def test_out_of_range_values_are_refused_before_anything_is_written(synth_data, tmp_path, capsys, override, key):
    run = tmp_path / "run"
    assert main(_train_args(synth_data, run, "solver.max_iter=1", override)) == 2
    line = _error_line(capsys)
    assert key in line and override.split("=", 1)[1] in line
    assert not run.exists()


# --------------------------------------------------------------------------- images as a viewer shows them


def test_predict_applies_the_exif_orientation(trained, tmp_path):
    stored = np.zeros((70, 90, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": a portrait photo stored landscape
    src = tmp_path / "portrait.jpg"
    Image.fromarray(stored).save(src, exif=exif.tobytes())
    assert main(["predict", str(src), "--checkpoint", str(trained), "--out", str(tmp_path / "png"), "--draw"]) == 0
    with Image.open(tmp_path / "png" / "portrait.png") as drawn:
        assert drawn.size == (70, 90)
