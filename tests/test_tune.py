"""Hyperparameter search: the search config and its checks, the results it writes, and real
Ray Tune searches of Ray Train trials on a local cluster (a small TPE + ASHA search, a
search stopped by its time budget, and one interrupted with Ctrl-C and resumed)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import CONFIGS, TINY_SYNTHETIC, _free_port
from uniinst.cli import main as cli_main
from uniinst.config import ConfigError, load_config
from uniinst.search.config import Param, load_search_config, search_to_dict
from uniinst.search.results import (
    COMPLETED,
    FAILED,
    STOPPED,
    UNFINISHED,
    TrialRecord,
    best_trial,
    format_markdown,
    plot_metric,
    rank,
    trial_state,
    write_best_config,
    write_csv,
)

pytestmark = pytest.mark.timeout(900)

# Trials small enough for a 2-core machine: a narrow model on 128-px synthetic shapes, six
# iterations with an evaluation every two.
TINY_TRIAL = [
    *TINY_SYNTHETIC,
    "data.batch_size=2",
    "data.num_workers=0",
    "solver.max_iter=6",
    "solver.warmup_iters=2",
    "solver.steps=[]",
    "train.eval_period=2",
    "ray.cpus_per_worker=0.5",
    "ray.max_failures=0",
]

SPACE = {
    "model.oyor.alpha": {"uniform": [0.0, 1.0]},
    "model.loss.cls": {"loguniform": [0.5, 2.0]},
    "model.loss.mask": {"loguniform": [0.5, 2.0]},
}


def _write_search(path: Path, storage: Path, **fields) -> Path:
    data = {
        "name": "small",
        "experiment": str(CONFIGS / "synth_R18_uniinst.yaml"),
        "trial_overrides": TINY_TRIAL,
        "storage_path": str(storage),
        "space": SPACE,
        "search": {"algorithm": "tpe", "num_samples": 4, "max_concurrent": 2, "seed": 3},
        "scheduler": {"type": "asha"},
        **fields,
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --------------------------------------------------------------------------- the config


def test_search_config_reads_the_space_and_shapes_the_trials(tmp_path):
    cfg = load_search_config(_write_search(tmp_path / "s.yaml", tmp_path / "out"), ["search.num_samples=6"])
    assert cfg.search.num_samples == 6 and cfg.metric_key == "val/AP"
    assert [p.kind for p in cfg.space] == ["uniform", "loguniform", "loguniform"]
    trial = cfg.trial_config()
    # Every report must carry val AP: the trials log and save at each evaluation.
    assert trial.train.log_period == trial.train.checkpoint_period == trial.train.eval_period == 2
    assert trial.solver.max_iter == 6
    # The best config's base is the experiment as written, without the trial overrides.
    assert cfg.experiment_config().solver.max_iter == load_config(CONFIGS / "synth_R18_uniinst.yaml").solver.max_iter
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(search_to_dict(cfg)))
    assert search_to_dict(load_search_config(again)) == search_to_dict(cfg)


def test_experiment_overrides_reach_the_trials_and_the_best_config(tmp_path):
    cfg = load_search_config(
        _write_search(tmp_path / "s.yaml", tmp_path / "out", experiment_overrides=["data.batch_size=3"]),
        experiment_overrides=["model.num_classes=5"], storage_path=str(tmp_path / "elsewhere"), name="renamed",
    )
    assert cfg.experiment_overrides == ["data.batch_size=3", "model.num_classes=5"]
    assert cfg.storage_path == str(tmp_path / "elsewhere") and cfg.name == "renamed"
    for exp in (cfg.trial_config(), cfg.experiment_config()):
        assert exp.model.num_classes == 5
    # The trial overrides come last: they win over the experiment overrides, for the trials only.
    assert cfg.trial_config().data.batch_size == 2 and cfg.experiment_config().data.batch_size == 3
    with pytest.raises(ConfigError, match="model.num_clases"):
        load_search_config(tmp_path / "s.yaml", experiment_overrides=["model.num_clases=5"])


def test_experiment_path_is_relative_to_the_search_file(tmp_path):
    (tmp_path / "sub").mkdir()
    exp = tmp_path / "sub" / "exp.yaml"
    exp.write_text(f"base: {CONFIGS / 'synth_R18_uniinst.yaml'}\nname: mine\n")
    path = _write_search(tmp_path / "sub" / "s.yaml", tmp_path, experiment="exp.yaml")
    assert load_search_config(path).experiment_config().name == "mine"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"serach": {}}, "unknown key serach"),
        ({"search": {"algorithm": "bayes"}}, "search.algorithm"),
        ({"space": {"model.oyor.alpa": {"uniform": [0, 1]}}}, "model.oyor.alpa"),
        ({"space": {"model.oyor.alpha": {"uniform": [0.2, 1.5]}}}, "model.oyor.alpha must be in [0, 1], got 1.5"),
        ({"space": {"model.loss.cls": {"loguniform": [0.0, 1.0]}}}, "bounds must be > 0"),
        ({"space": {"model.loss.cls": {"uniform": [2.0, 1.0]}}}, "low must be below high"),
        ({"space": {"model.loss.cls": {"normal": [0, 1]}}}, "unknown kind 'normal'"),
        ({"space": {"model.oyor.dice": {"choice": ["binary", "hard"]}}}, "'hard' is not one of"),
        ({"space": {"model.oyor.alpha": {"grid": [0.2, 0.9]}}}, "TPE samples, it cannot sweep a grid"),
        (
            {"space": {"model.oyor.alpha": {"uniform": [0, 1]}}, "search": {"algorithm": "grid"}},
            "grid needs grid values",
        ),
        ({"trial_overrides": [*TINY_TRIAL, "train.eval_period=0"]}, "train.eval_period > 0"),
        ({"space": {}}, "space"),
    ],
)
def test_search_config_errors_name_the_key(tmp_path, change, message):
    with pytest.raises(ConfigError) as err:
        load_search_config(_write_search(tmp_path / "s.yaml", tmp_path, **change))
    assert message in str(err.value) and "s.yaml" in str(err.value)


def test_shipped_search_configs_load():
    for path in sorted(CONFIGS.glob("tune_*.yaml")):
        cfg = load_search_config(path)
        assert cfg.space and cfg.trial_config().train.eval_period > 0, path


def test_tune_space_and_concurrency(tmp_path):
    from ray import tune

    from uniinst.ray.tune import concurrency, trial_resources, tune_space

    space = tune_space([
        Param("a", "uniform", (0.0, 1.0)), Param("b", "loguniform", (0.1, 10.0)),
        Param("c", "grid", (1, 2, 3)), Param("d", "choice", ("x", "y")),
    ])
    assert isinstance(space["a"], tune.search.sample.Float) and (space["a"].lower, space["a"].upper) == (0.0, 1.0)
    assert isinstance(space["b"].sampler, tune.search.sample.LogUniform)
    assert space["c"] == {"grid_search": [1, 2, 3]}
    assert space["d"].categories == ["x", "y"]

    cfg = load_search_config(_write_search(tmp_path / "s.yaml", tmp_path, search={"max_concurrent": 0}))
    trial = cfg.trial_config()
    # One worker of half a CPU, and a CPU for its data tasks.
    assert trial_resources(trial) == {"CPU": 1.5}
    assert concurrency(cfg.search.max_concurrent, trial, {"CPU": 8.0}) == 5
    assert concurrency(cfg.search.max_concurrent, trial, {"CPU": 1.0}) == 1
    trial.ray.use_gpu, trial.ray.num_workers, trial.ray.cpus_per_worker = True, 4, 2.0
    assert trial_resources(trial) == {"CPU": 9.0, "GPU": 4.0}
    assert concurrency(cfg.search.max_concurrent, trial, {"CPU": 64.0, "GPU": 16.0}) == 4  # the GPUs decide
    cfg.search.max_concurrent = 3
    assert concurrency(cfg.search.max_concurrent, trial, {"CPU": 64.0, "GPU": 16.0}) == 3


# --------------------------------------------------------------------------- the results


def _records() -> list[TrialRecord]:
    def values(alpha: float, cls: float) -> dict[str, float]:
        return {"model.oyor.alpha": alpha, "model.loss.cls": cls}

    return [
        TrialRecord("a", values(0.9, 1.0), {"AP": 0.30, "AP50": 0.5, "AP75": 0.3}, 6, COMPLETED),
        TrialRecord("b", values(0.1, 2.0), {"AP": 0.40, "AP50": 0.6, "AP75": 0.4}, 2, STOPPED),
        TrialRecord("c", values(0.5, 0.7), {"AP": 0.35, "AP50": 0.5, "AP75": 0.3}, 6, COMPLETED),
        TrialRecord("d", values(0.2, 0.9), {}, 0, FAILED, error="boom"),
    ]


def test_states_ranking_and_best_trial():
    assert trial_state("TERMINATED", 6, 6) == COMPLETED
    assert trial_state("TERMINATED", 4, 6) == STOPPED
    assert trial_state("ERROR", 2, 6) == FAILED
    assert trial_state("PENDING", 0, 6) == trial_state("RUNNING", 2, 6) == UNFINISHED
    records = _records()
    # b scores higher but was stopped early: a trial that ran the whole schedule wins.
    assert best_trial(records, "AP").trial_id == "c"
    assert [r.trial_id for r in rank(records, "AP")] == ["c", "a", "b", "d"]
    assert best_trial([records[1], records[3]], "AP").trial_id == "b"
    assert best_trial([records[3]], "AP") is None


def test_table_plots_and_best_config(tmp_path):
    space = [Param("model.oyor.alpha", "uniform", (0.0, 1.0)), Param("model.loss.cls", "loguniform", (0.5, 2.0))]
    records = rank(_records(), "AP")
    rows = list(csv.DictReader(write_csv(records, space, tmp_path / "results.csv").open()))
    assert [r["trial_id"] for r in rows] == ["c", "a", "b", "d"]
    assert rows[0]["AP"] == "35.0" and rows[0]["model.oyor.alpha"] == "0.5" and rows[3]["error"] == "boom"
    table = format_markdown(records, space)
    assert table.splitlines()[0] == (
        "| trial | state | iteration | AP | AP50 | AP75 | model.oyor.alpha | model.loss.cls | failures |"
    )
    assert "| b | stopped early | 2 | 40.0 | 60.0 | 40.0 | 0.1 | 2 | 0 |" in table

    plots = plot_metric(records, space, tmp_path / "plots")
    assert [p.name for p in plots] == ["AP_vs_model_oyor_alpha.png", "AP_vs_model_loss_cls.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000 for p in plots)

    experiment = load_config(CONFIGS / "synth_R18_uniinst.yaml")
    path = write_best_config(experiment, records[0], tmp_path / "best.yaml", search_name="s", metric="AP")
    assert path.read_text().startswith("# Best trial c of search 's': val mask AP 35.0")
    best = load_config(path)
    assert best.model.oyor.alpha == 0.5 and best.model.loss.cls == 0.7
    assert best.solver.max_iter == experiment.solver.max_iter and best.name == "synth_R18_uniinst_s_best"


# --------------------------------------------------------------------------- real searches


@pytest.fixture(scope="module")
def ray_with_dashboard(aws_test_env):
    """A local Ray with its dashboard: Ray Train's placement-group cleaner, which frees the
    resources of stopped trials, asks the state API (served by the dashboard) whether a
    run's controller is still alive."""
    import ray

    from conftest import limit_ray_data, restore_local_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.shutdown()
    ray.init(
        address="local", num_cpus=2, include_dashboard=True, dashboard_port=_free_port(),
        object_store_memory=300 * 1024**2, log_to_driver=False,
    )
    limit_ray_data()
    yield ray
    ray.shutdown()
    restore_local_ray()


def _resources_held(timeout: float = 60.0) -> str:
    """What stays reserved ``timeout`` seconds from now at most: placement groups not removed and
    CPUs not available; empty once everything is given back."""
    import ray
    from ray.util import placement_group_table

    deadline = time.time() + timeout
    while True:
        alive = {pg["placement_group_id"][:8]: pg["state"] for pg in placement_group_table().values()
                 if pg["state"] != "REMOVED"}
        free, total = ray.available_resources().get("CPU", 0.0), ray.cluster_resources().get("CPU", 0.0)
        if not alive and free == total:
            return ""
        if time.time() > deadline:
            from ray.util.state import list_actors

            actors = [(a.class_name, a.state) for a in list_actors(limit=1000, raise_on_missing_output=False)
                      if a.state != "DEAD"]
            return f"placement groups {alive}, {free} of {total} CPUs free; actors {actors}"
        time.sleep(0.5)


def _count_resumes(run: Path) -> int:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return sum("event/resumed" in json.loads(line) for line in lines)


def _kill_a_trial_once_it_has_a_checkpoint(out: Path, killed: list[str], stop: threading.Event) -> None:
    """SIGKILL the driver process of a running trial (Tune's ``ImplicitFunc`` actor, working
    in a folder named after its trial) once Ray Train has registered a checkpoint of it (a
    checkpoint still being saved is not one to resume from)."""
    import psutil

    while not stop.is_set():
        saved = set()
        for snapshot in out.glob("trials/*/checkpoint_manager_snapshot.json"):
            try:
                if json.loads(snapshot.read_text()).get("checkpoint_results"):
                    saved.add(snapshot.parent.name)
            except ValueError:  # being written
                continue
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if not any("ImplicitFunc" in part for part in proc.info["cmdline"] or []):
                    continue
                trial = next((t for t in saved if f"_{t}_" in proc.cwd()), None)
                if trial is not None:
                    proc.kill()
                    killed.append(trial)
                    return
            except psutil.Error:
                continue
        time.sleep(0.1)


def test_small_search_writes_table_plots_and_a_best_config_that_trains(tmp_path, ray_with_dashboard):
    from uniinst.engine.local import train_local
    from uniinst.ray.tune import run_search

    search = {"algorithm": "tpe", "num_samples": 2, "max_concurrent": 2, "seed": 3}
    cfg = load_search_config(_write_search(tmp_path / "search.yaml", tmp_path / "searches", search=search))
    out = tmp_path / "searches" / "small"
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_a_trial_once_it_has_a_checkpoint, args=(out, killed, stop), daemon=True)
    killer.start()
    try:
        result = run_search(cfg)
    finally:
        stop.set()
        killer.join()

    assert killed, "no trial was killed"
    assert result.finished and len(result.records) == 2
    # The killed trial failed once, was retried (max_failures: 1) and continued its Ray Train
    # run from the checkpoint it had saved.
    assert {r.trial_id: r.failures for r in result.records if r.failures} == {killed[0]: 1}
    assert _count_resumes(out / "trials" / killed[0]) == 1
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 and len({r["trial_id"] for r in rows}) == 2
    for row in rows:
        assert row["state"] in (COMPLETED, STOPPED), row
        assert 2 <= int(row["iteration"]) <= 6 and row["AP"] != "" and row["AP75"] != ""
        assert 0.0 <= float(row["model.oyor.alpha"]) <= 1.0
        assert 0.5 <= float(row["model.loss.cls"]) <= 2.0 and 0.5 <= float(row["model.loss.mask"]) <= 2.0
        # Each trial is a Ray Train run of its own, evaluated at every report.
        run = Path(row["run"])
        assert run.parent == out / "trials" and list(run.glob("checkpoint_*/state.pt"))
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert any("val/AP" in entry for entry in logged)
    assert len({(r["model.oyor.alpha"], r["model.loss.cls"]) for r in rows}) == 2  # TPE drew 2 points
    assert (out / "results.md").read_text().count("\n| ") == 3  # header + 2 trials
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "AP_vs_model_loss_cls.png", "AP_vs_model_loss_mask.png", "AP_vs_model_oyor_alpha.png"
    ]
    assert (out / "data" / "train" / "manifest.json").is_file()  # the shards, made once for all trials

    best = load_config(out / "best_config.yaml")
    assert best.model.oyor.alpha == pytest.approx(result.best.params["model.oyor.alpha"])
    assert best.model.loss.mask == pytest.approx(result.best.params["model.loss.mask"])
    assert best.data.synthetic  # the experiment as written, not the trials' shards
    trained = train_local(
        load_config(
            out / "best_config.yaml",
            [*TINY_SYNTHETIC, "data.num_workers=0", "solver.max_iter=2", "train.eval_period=0",
             f"train.output_dir={tmp_path / 'best'}"],
        )
    )
    assert trained.iteration == 2 and Path(trained.checkpoint).is_file()
    assert not (held := _resources_held()), held


def test_a_search_out_of_time_stops_its_trials_and_gives_their_resources_back(tmp_path, ray_with_dashboard):
    from uniinst.ray.tune import run_search

    path = _write_search(
        tmp_path / "search.yaml", tmp_path / "searches", name="budget",
        trial_overrides=[*TINY_TRIAL, "solver.max_iter=100000"],
        search={"algorithm": "random", "num_samples": 2, "max_concurrent": 2, "time_budget_s": 30},
    )
    result = run_search(load_search_config(path))
    assert {r.state for r in result.records} <= {STOPPED, UNFINISHED}
    assert all(r.iteration < 100000 for r in result.records)
    # Their Ray Train runs had started (and hold placement groups) when the budget ran out.
    assert all((Path(r.run) / "config.yaml").is_file() for r in result.records)
    assert not (held := _resources_held()), held


def test_interrupted_search_resumes_without_rerunning_finished_trials(tmp_path, capsys):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1"}
    env.pop("RAY_ADDRESS", None)
    path = _write_search(
        tmp_path / "search.yaml", tmp_path / "searches", name="interrupted",
        trial_overrides=[*TINY_TRIAL, "solver.max_iter=4"],
        search={"algorithm": "random", "num_samples": 2, "max_concurrent": 1, "seed": 1},
    )
    out = tmp_path / "searches" / "interrupted"
    uniinst = [sys.executable, "-m", "uniinst.cli", "tune", "--config", str(path)]
    first = subprocess.Popen(
        uniinst, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    # One trial at a time: the second starts its run once Tune has recorded the first as done.
    deadline = time.time() + 400
    while len(list(out.glob("trials/*/config.yaml"))) < 2 and time.time() < deadline and first.poll() is None:
        time.sleep(0.5)
    assert len(list(out.glob("trials/*/summary.json"))) == 1, "the first trial did not finish"
    first.send_signal(signal.SIGINT)  # Ctrl-C, while the second trial trains
    log, _ = first.communicate(timeout=180)
    assert first.returncode == 1, log[-3000:]
    assert "continue it with --resume" in log

    done_before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("trials/*/summary.json")}
    # The results so far, without running anything.
    assert cli_main(["tune", "--config", str(path), "--collect"]) == 0
    states = [r["state"] for r in csv.DictReader((out / "results.csv").open())]
    assert len(states) == 2 and states.count(COMPLETED) == len(done_before) and UNFINISHED in states
    again = subprocess.run([*uniinst, "--resume"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 and {r["state"] for r in rows} == {COMPLETED}
    assert sorted(p.name for p in (out / "trials").iterdir()) == sorted(r["trial_id"] for r in rows)
    for trial_id, mtime in done_before.items():
        # A finished trial was neither rerun nor resumed.
        assert (out / "trials" / trial_id / "summary.json").stat().st_mtime_ns == mtime
        assert _count_resumes(out / "trials" / trial_id) == 0
    assert (out / "best_config.yaml").is_file()

    capsys.readouterr()
    assert cli_main(["tune", "--config", str(path)]) == 2
    assert "--resume" in capsys.readouterr().err
