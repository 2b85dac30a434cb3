"""Reproduction suites: the suite config and its checks, the duplicates measure on hand-built
predictions, the report's tables and verdicts on hand-written rows, and a tiny suite run
by Ray Tune on a local Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from pycocotools import mask as mask_util

from conftest import CONFIGS, TINY_SYNTHETIC
from uniinst.cli import main as cli_main
from uniinst.config import ConfigError
from uniinst.evaluation.uniqueness import duplicates_per_instance, suppressed_count
from uniinst.reproduce.report import Bound, SuiteReport, variant_roles
from uniinst.reproduce.suite import load_suite, suite_to_dict, comma_names

pytestmark = pytest.mark.timeout(900)

SUITES = CONFIGS / "reproduce"


def _write_suite(path: Path, **fields) -> Path:
    data = {
        "name": "tiny",
        "experiment": str(CONFIGS / "synth_R18_uniinst.yaml"),
        "experiment_overrides": [
            *TINY_SYNTHETIC, "data.batch_size=2", "solver.max_iter=3", "solver.warmup_iters=1", "solver.steps=[]",
            "train.checkpoint_period=3", "train.eval_period=0", "ray.num_workers=1", "ray.cpus_per_worker=0.5",
            "ray.max_failures=0",
        ],
        "storage_path": str(path.parent / "suites"),
        "seeds": [0],
        "max_concurrent": 1,
        "occlusion_split": "heavy",
        "splits": {
            "val": {"synthetic": {"images": 3, "seed": 1000}},
            "heavy": {"synthetic": {"images": 3, "seed": 1001, "occlusion": "heavy"}},
        },
        "variants": {"uniinst": [], "condinst": ["model.arch=condinst"]},
        **fields,
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --------------------------------------------------------------------------- the config


def test_shipped_suites_load_and_place_every_variant():
    for name in ("synth", "coco_R50"):
        suite = load_suite(SUITES / f"{name}.yaml")
        roles = variant_roles(suite)
        # Every variant lands in one of the paper's tables; none is left over.
        assert all(role.table for role in roles.values()), roles
        assert {r.table for r in roles.values()} == {"1", "4", "5", "6"}
        assert len(suite.seeds) >= 2 and suite.occlusion_split
    coco = load_suite(SUITES / "coco_R50.yaml")
    trained = coco.variant_config("alpha_0.4", seed=1)
    assert trained.model.oyor.alpha == 0.4 and trained.train.seed == 1 and trained.ray.num_workers == 8
    assert trained.data.train.shards.startswith("s3://")


def test_part_of_a_suite_keeps_the_named_variants_in_the_suite_order(tmp_path):
    part = load_suite(SUITES / "synth.yaml", variants=comma_names("condinst, uniinst"))
    assert list(part.variants) == ["uniinst", "condinst"]
    assert part.variant_config("condinst").model.arch == "condinst"
    with pytest.raises(ConfigError, match=r"unknown variant\(s\) 'alpha_9'.*the suite has: uniinst, condinst, alpha_0"):
        load_suite(SUITES / "synth.yaml", variants=["uniinst", "alpha_9"])
    table5 = load_suite(SUITES / "synth.yaml", variants=["no_3dmf_no_rerank", "uniinst"])
    assert list(table5.variants) == ["uniinst", "no_3dmf_no_rerank"] and table5.baseline == ""
    written = tmp_path / "suite.yaml"  # what a run of the part writes down loads again as it ran
    written.write_text(yaml.safe_dump(suite_to_dict(table5), sort_keys=False))
    assert load_suite(written) == table5
    with pytest.raises(ConfigError, match="must keep its reference variant 'uniinst'"):
        load_suite(SUITES / "synth.yaml", variants=["condinst", "alpha_0"])


def test_suite_round_trips_through_its_yaml(tmp_path):
    suite = load_suite(_write_suite(tmp_path / "s.yaml"))
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(suite_to_dict(suite)))
    assert suite_to_dict(load_suite(again)) == suite_to_dict(suite)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"variants": {"uniinst": [], "condinst": ["model.arch=condinst"], "typo": ["model.oyor.alfa=0.5"]}},
         "variants.typo: override 'model.oyor.alfa=0.5': unknown key model.oyor.alfa"),
        ({"variants": {"uniinst": [], "condinst": ["model.arch=condinst"], "bad": ["model.oyor.alpha=2"]}},
         "variants.bad"),
        ({"main_split": "test"}, "main_split: unknown split 'test'"),
        ({"occlusion_split": "ochuman"}, "occlusion_split: unknown split 'ochuman'"),
        ({"splits": {"val": {"synthetic": {"images": 3}, "shards": "s3://b/x"}}}, "splits.val: give exactly one"),
        ({"splits": {"val": {"synthetic": {"images": 3, "colour": 1}}}}, "unknown key splits.val.synthetic.colour"),
        ({"splits": {"val": {"synthetic": {"images": 3, "seed": 0}}}, "occlusion_split": ""},
         "splits.val.synthetic.seed=0: the training set is generated with train.seed=0"),
        ({"baseline": "uniinst"}, "baseline: variant 'uniinst' trains model.arch=uniinst, expected condinst"),
        ({"reference": "ours"}, "reference: unknown variant 'ours'"),
        ({"nms": ["none", "soft"]}, "nms: expected modes among"),
        ({"seeds": [1, 1]}, "seeds: expected distinct integers"),
    ],
)
def test_bad_suites_are_refused_naming_the_key(tmp_path, fields, message):
    with pytest.raises(ConfigError) as info:
        load_suite(_write_suite(tmp_path / "s.yaml", **fields))
    assert message in str(info.value) and "s.yaml" in str(info.value)


def test_cli_refuses_a_bad_suite_in_one_line_before_any_run(tmp_path, capsys):
    path = _write_suite(tmp_path / "s.yaml", variants={"uniinst": ["model.oyor.alfa=1"], "condinst": ["model.arch=condinst"]})
    assert cli_main(["reproduce", "--suite", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "variants.uniinst" in err[0] and "alfa" in err[0]
    assert not (tmp_path / "suites").exists()


def test_scoring_takes_what_the_run_gave_back():
    from uniinst.ray.reproduce import scoring_resources

    synth = load_suite(SUITES / "synth.yaml")
    # Two runs at once of one half-CPU worker each: scoring one leaves a CPU to the read tasks.
    assert scoring_resources(synth.variant_config("uniinst")) == {"num_cpus": 0.5}
    coco = load_suite(SUITES / "coco_R50.yaml").variant_config("uniinst")
    assert scoring_resources(coco) == {"num_gpus": 1}
    coco.ray.use_gpu = False
    assert scoring_resources(coco) == {"num_cpus": 1.0}


# --------------------------------------------------------------------------- the duplicates measure


def _result(image_id: int, cat: int, score: float, box: tuple[int, int, int, int], size: int = 20) -> dict:
    mask = np.zeros((size, size), dtype=np.uint8, order="F")
    y0, x0, y1, x1 = box
    mask[y0:y1, x0:x1] = 1
    rle = mask_util.encode(mask)
    return {"image_id": image_id, "category_id": cat, "score": score,
            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}}


def test_duplicates_count_what_mask_nms_would_remove():
    results = [
        _result(1, 1, 0.9, (0, 0, 10, 10)),
        _result(1, 1, 0.6, (0, 0, 10, 9)),    # IoU 0.9 with the first: removed
        _result(1, 2, 0.8, (0, 0, 10, 10)),   # same mask, another class: kept
        _result(1, 1, 0.2, (0, 0, 10, 10)),   # a duplicate below 0.3: not counted
        _result(1, 1, 0.5, (0, 4, 10, 14)),   # IoU 6/14 = 0.43 with the first: kept
        # A chain: B (removed by A) would have removed C, but a removed mask removes nothing.
        _result(2, 3, 0.9, (0, 0, 10, 10)),   # A
        _result(2, 3, 0.8, (0, 3, 10, 13)),   # B: IoU 7/13 = 0.54 with A
        _result(2, 3, 0.7, (0, 6, 10, 16)),   # C: IoU 4/16 with A, 7/13 with B
    ]
    assert suppressed_count(results, score_threshold=0.3, iou_threshold=0.5) == 2
    assert duplicates_per_instance(results, 4) == pytest.approx(0.5)
    # At IoU 0.4 the 0.43-overlap mask goes too; at score 0.95 nothing is left to remove.
    assert suppressed_count(results, score_threshold=0.3, iou_threshold=0.4) == 3
    assert suppressed_count(results, score_threshold=0.95, iou_threshold=0.5) == 0
    with pytest.raises(ValueError, match="num_instances"):
        duplicates_per_instance(results, 0)


# --------------------------------------------------------------------------- the report


def _rows(values: dict[tuple[str, str, str], list[float]]) -> list[dict]:
    rows = []
    for (variant, split, nms), aps in values.items():
        for seed, ap in enumerate(aps):
            rows.append({"variant": variant, "seed": seed, "split": split, "nms": nms, "AP": ap, "AP50": ap + 10,
                         "AP75": ap - 5, "AR100": ap + 20, "duplicates_per_gt": 0.1 if variant == "uniinst" else 0.8,
                         "iterations": 100})
    return rows


def test_report_tables_and_verdicts_follow_the_rows():
    suite = load_suite(SUITES / "synth.yaml")
    values = {
        ("uniinst", "val", "none"): [30.0, 32.0], ("uniinst", "val", "mask"): [30.5, 32.5],
        ("condinst", "val", "none"): [20.0, 22.0], ("condinst", "val", "mask"): [28.0, 29.0],
        ("alpha_0", "val", "none"): [25.0, 26.0], ("alpha_1", "val", "none"): [33.0, 33.0],
        ("no_aux", "val", "none"): [29.0, 30.0],
        ("uniinst", "heavy", "none"): [15.0, 16.0], ("condinst", "heavy", "mask"): [17.0, 18.0],
    }
    report = SuiteReport(suite, _rows(values))
    text = report.markdown()
    t1_uniinst, t1_baseline, t4, t5, t6, t7 = report.claims()
    assert t1_uniinst.holds is True  # −0.5 AP without NMS
    assert t1_baseline.holds is True and "-7.5 ± 0.7" in t1_baseline.numbers
    assert t4.holds is False  # α 1 scored above α 0.9 here
    assert t5.holds is None  # its runs are missing
    assert t6.holds is True
    assert t7.holds is False and "-2.0 ± 0.0" in t7.numbers
    assert "| UniInst (one-to-one) `uniinst` | 31.5 ± 1.4 (38.5) | 31.0 ± 1.4 (38.3) | -0.5 ± 0.0 (-0.2) |" in text
    assert "| 0.9 | `uniinst` | 31.0 ± 1.4 (37.9) |" in text and "| 1 | `alpha_1` | 33.0 ± 0.0 (11.8) |" in text
    assert "**does not hold**" in text and "not measured" in text
    # Over 2 seeds the 95 % interval is ±12.7 standard errors (std / √2): T1b's -7.5 ± 0.7 (2.5 from
    # its bound) and T6's +1.5 ± 0.7 lie inside; T1a's and T7's differences do not vary.
    assert t1_uniinst.within_noise == () and t7.within_noise == ()
    assert t1_baseline.within_noise == ("w/o − w/ NMS",) and t6.within_noise == ("with − without",)
    assert "**holds**, inside the seeds' noise (with − without: the bound lies in its 95 % confidence" in text
    # Over 4 seeds, ±3.18 standard errors: +1.4 ± 0.3 is outside, +0.3 ± 0.6 inside.
    assert not Bound(0.0).within_noise([1.0, 2.0, 1.5, 1.2]) and Bound(0.0).within_noise([0.5, -0.2, 1.0, -0.1])


def test_a_part_without_the_baseline_reports_its_own_table_and_names_what_is_missing(tmp_path):
    part = load_suite(SUITES / "synth.yaml", variants=["uniinst", "no_3dmf_no_rerank", "3dmf_only", "rerank_only"])
    values = {("uniinst", "val", "none"): [12.0, 13.0], ("no_3dmf_no_rerank", "val", "none"): [11.0, 11.5],
              ("3dmf_only", "val", "none"): [11.5, 12.5], ("rerank_only", "val", "none"): [11.0, 12.5]}
    report = SuiteReport(part, _rows(values))
    text = report.markdown()
    claims = {(c.tag, c.text[:12]): c for c in report.claims()}
    t5 = claims[("T5", "3DMF and re-")]
    assert t5.holds is True  # +0.8 and +0.5 over none, both above each alone
    # Only both − 3DMF (+0.5 in both seeds) is outside its 95 % interval around 0.
    assert t5.within_noise == ("3DMF − none", "re-ranking − none", "both − re-ranking")
    assert claims[("T1", "the many-to-")].holds is None and "a run is missing" in claims[("T1", "the many-to-")].numbers
    assert "| CondInst-style baseline (many-to-one) (not in this suite) | — | — | — | — |" in text
    assert "| ✓ | ✓ | `uniinst` | 12.5 ± 0.7 (37.9) |" in text
    assert len(report.plots(tmp_path)) == 3


def test_a_suite_run_whose_rows_are_written_is_neither_trained_nor_scored_again(tmp_path):
    # A resumed suite reruns the trials Tune had not recorded as done; one that had scored its
    # run just before the interruption must not train or score it again (the rest of a resume
    # is Tune's restore, tests/test_tune.py, and a Ray Train run's own, tests/test_train_distributed.py).
    from uniinst.config import to_dict
    from uniinst.ray.reproduce import SuiteTrialSetup, run_suite_trial

    suite = load_suite(_write_suite(tmp_path / "suite.yaml"))
    runs = tmp_path / "runs"
    rows = runs / suite.run_name("uniinst", 0) / "rows.json"
    rows.parent.mkdir(parents=True)
    rows.write_text("[]")
    setup = SuiteTrialSetup(suite, to_dict(suite.experiment_config()), {}, str(runs))
    run_suite_trial({"run": {"variant": "uniinst", "seed": 0}}, setup)
    assert rows.read_text() == "[]" and [p.name for p in rows.parent.iterdir()] == ["rows.json"]


# --------------------------------------------------------------------------- a real suite


def test_tiny_suite_writes_every_row_report_and_plot(tmp_path, capsys):
    # Ctrl-C of a Tune run and the resume of its unfinished trials without rerunning finished
    # ones are the search's (the same Tuner.restore as uniinst tune: tests/test_tune.py); here
    # the suite's own part: its rows, report and plots, and the refusals before any run.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1"}
    env.pop("RAY_ADDRESS", None)
    path = _write_suite(tmp_path / "suite.yaml")
    out = tmp_path / "suites" / "tiny"
    uniinst = [sys.executable, "-m", "uniinst.cli", "reproduce", "--suite", str(path)]
    first = subprocess.run(uniinst, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    scored = {p.parent.name for p in (out / "runs").glob("*/rows.json")}
    assert scored == {"uniinst-seed0", "condinst-seed0"}
    rows = json.loads((out / "results.json").read_text())
    keys = {(r["variant"], r["split"], r["nms"]) for r in rows}
    assert keys == {(v, s, n) for v in ("uniinst", "condinst") for s in ("val", "heavy") for n in ("none", "mask")}
    assert len(rows) == 8 and all(r["iterations"] == 3 and 0 <= r["AP"] <= 100 for r in rows)
    assert all(r["duplicates_per_gt"] >= 0 for r in rows)
    report = (out / "report.md").read_text()
    assert "## Table 1" in report and "## Table 7" in report and "(T7)" in report
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "AP_nms_per_variant.png", "AP_vs_alpha.png", "duplicates_per_variant.png"
    ]
    capsys.readouterr()
    assert cli_main(["reproduce", "--suite", str(path)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli_main(["reproduce", "--suite", str(path), "--resume", "--out", str(tmp_path / "none")]) == 2
    assert "no suite to resume" in capsys.readouterr().err and not (tmp_path / "none").exists()
