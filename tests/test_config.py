from pathlib import Path

import pytest

from uniinst.config import ConfigError, config_from_dict, dump_config, load_config, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


EXPERIMENTS = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("tune_"))  # tune_*: searches


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.num_classes >= 1


def test_paper_configs_follow_the_spec():
    r50 = load_config(CONFIGS / "uniinst_R50_3x.yaml")
    assert (r50.model.arch, r50.model.backbone.depth, r50.model.oyor.alpha) == ("uniinst", 50, 0.9)
    assert (r50.solver.max_iter, r50.solver.steps) == (270000, [210000, 250000])
    r101 = load_config(CONFIGS / "uniinst_R101_6x.yaml")
    assert (r101.model.backbone.depth, r101.solver.max_iter, r101.solver.steps) == (101, 540000, [480000, 520000])
    assert r101.model.backbone.norm == "FrozenBN"  # inherited through the base chain
    base = load_config(CONFIGS / "condinst_R50_3x.yaml")
    assert base.model.arch == "condinst" and base.model.inference.nms == "mask"


def test_dotted_overrides_parse_yaml_values():
    cfg = load_config(CONFIGS / "uniinst_R50_3x.yaml", ["model.oyor.alpha=0.8", "solver.steps=[10, 20]", "data.flip_prob=0"])
    assert cfg.model.oyor.alpha == 0.8
    assert cfg.solver.steps == [10, 20]
    assert cfg.data.flip_prob == 0.0 and isinstance(cfg.data.flip_prob, float)


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.oyor.alpah=0.8", "model.oyor.alpah"),
        ("model.oyor.alpha=high", "model.oyor.alpha"),
        ("solver.max_iter=10.5", "solver.max_iter"),
        ("model.rerank=1", "model.rerank"),
        ("model.arch=maskrcnn", "model.arch"),
        ("solver.steps=[1, x]", "solver.steps[1]"),
        ("model.backbone=50", "model.backbone"),
        ("model.backbone.style=tf", "model.backbone.style"),
        ("model.pixel_mean=[1, 2]", "model.pixel_mean"),
    ],
)
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(CONFIGS / "uniinst_R50_3x.yaml", [override])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  backbone:\n    depht: 50\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "model.backbone.depht" in str(err.value) and str(bad) in str(err.value)


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="alpha"):
        load_config(None, ["model.oyor.alpha=1.5"])
    with pytest.raises(ConfigError, match="steps"):
        load_config(None, ["solver.steps=[20, 10]"])
    with pytest.raises(ConfigError, match=r"data.synthetic_shapes: .*got \['circle', 'blob'\]"):
        load_config(None, ["data.synthetic_shapes=[circle, blob]"])
    with pytest.raises(ConfigError, match="data.synthetic_shapes: num_classes"):
        load_config(None, ["data.synthetic=true", "model.num_classes=3", "data.synthetic_shapes=[circle, ring]"])


def test_missing_base_file_and_round_trip(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(child)
    cfg = load_config(CONFIGS / "uniinst_R50_6x.yaml", ["model.loss.aux=0.5"])
    path = dump_config(cfg, tmp_path / "dumped.yaml")
    assert load_config(path) == cfg
    assert config_from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.backbone.style=caffe", "model.backbone.depth=18"], "model.backbone.depth"),
        (["model.backbone.style=caffe", "model.backbone.pretrained=true"], "model.backbone.pretrained"),
    ],
)
def test_caffe_style_needs_a_bottleneck_resnet_without_torchvision_weights(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(CONFIGS / "uniinst_R50_3x.yaml", overrides)
