"""The core needs only the base dependencies: with the "ray" extra's packages unimportable, the
``uniinst`` command still makes data, trains, evaluates and predicts on COCO-format JSON, and
a command that needs the extra says how to install it."""

import json
import subprocess
import sys
import textwrap

from conftest import CONFIGS, REPO, TINY

# What `pip install -e .` lacks that `pip install -e ".[ray]"` brings (and what they bring in).
EXTRA_PACKAGES = ["ray", "pyarrow", "fsspec", "s3fs", "aiobotocore", "botocore", "boto3", "optuna", "moto"]

_SCRIPT = """
import importlib.abc, json, sys

BLOCKED = set({blocked!r})


class WithoutTheExtra(importlib.abc.MetaPathFinder):
    # As if the packages were not installed: every import of them fails as it would then.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, WithoutTheExtra())
from uniinst.cli import main

codes = [main(args) for args in json.loads(sys.argv[1])]
print("CODES", json.dumps(codes))
print("LOADED", json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & BLOCKED)))
"""


def _run_without_extra(tmp_path, commands):
    script = tmp_path / "without_extra.py"
    script.write_text(textwrap.dedent(_SCRIPT.format(blocked=EXTRA_PACKAGES)))
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(commands)], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    out = {line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
           if line.startswith(("CODES ", "LOADED "))}
    assert "CODES" in out, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out["CODES"], out["LOADED"], proc.stderr


def test_synth_train_evaluate_predict_need_no_extra(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    train = [
        "train", "--config", str(CONFIGS / "synth_R18_uniinst.yaml"), "--output-dir", str(run), *TINY,
        "data.synthetic=false", "solver.max_iter=2",
        f"data.train.json={data / 'annotations' / 'instances_train.json'}", f"data.train.images={data / 'train'}",
        f"data.val.json={data / 'annotations' / 'instances_val.json'}", f"data.val.images={data / 'val'}",
    ]
    ckpt = str(run / "checkpoints" / "model_0000002.pt")
    commands = [
        ["synth", "--out", str(data), "--train", "4", "--val", "2", "--size", "96"],
        train,
        ["evaluate", "--checkpoint", ckpt, "--out", str(tmp_path / "eval")],
        ["predict", str(data / "val" / "000001.jpg"), "--checkpoint", ckpt, "--out", str(tmp_path / "png")],
    ]
    codes, loaded, stderr = _run_without_extra(tmp_path, commands)
    assert codes == [0, 0, 0, 0], stderr[-3000:]
    assert loaded == []
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["AP"] >= 0
    assert (tmp_path / "png" / "000001.png").is_file()


def test_a_command_that_needs_the_extra_says_how_to_install_it(tmp_path):
    commands = [
        ["prepare", "--json", str(tmp_path / "a.json"), "--images", str(tmp_path), "--out", str(tmp_path / "o")],
        ["evaluate", "--shards", str(tmp_path / "shards"), "--checkpoint", str(tmp_path / "m.pt"), "--out", str(tmp_path)],
    ]
    codes, _, stderr = _run_without_extra(tmp_path, commands)
    assert codes == [2, 2]
    lines = [line for line in stderr.splitlines() if line.startswith("uniinst ")]
    assert len(lines) == 2 and all("pip install 'uniinst[ray]'" in line for line in lines), stderr
