"""The core needs only the base dependencies: with the "ray" extra's packages unimportable, the
``uniinst`` command still makes data, trains, evaluates and predicts on COCO-format JSON, and
a command that needs the extra says how to install it."""

import json
import subprocess
import sys
import textwrap

from conftest import CONFIGS, REPO, TINY
from PIL import Image

from uniinst.config import load_config, to_dict
from uniinst.engine.checkpoint import save_checkpoint
from uniinst.modeling.uniinst import build_model

# What `pip install -e .` lacks that the "ray" and "export" extras bring (and what they bring in).
EXTRA_PACKAGES = [
    "ray", "pyarrow", "fsspec", "s3fs", "aiobotocore", "botocore", "boto3", "optuna", "moto",
    "onnx", "onnxscript", "onnx_ir", "onnxruntime",
]

_SCRIPT = """
import json, sys

BLOCKED = set({blocked!r})
# As if the packages were not installed: importing one fails as it would then, and looking
# for one (importlib.util.find_spec, as torch does for onnx) finds nothing.
for name in BLOCKED:
    sys.modules[name] = None

from uniinst.cli import main

codes = [main(args) for args in json.loads(sys.argv[1])]
print("CODES", json.dumps(codes))
print("LOADED", json.dumps(sorted({{m.split(".")[0] for m, mod in sys.modules.items() if mod is not None}} & BLOCKED)))
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
        ["predict", str(data / "val" / "000001.jpg"), "--checkpoint", ckpt, "--out", str(tmp_path / "png"), "--draw"],
        ["export", "--checkpoint", ckpt, "--format", "torchscript", "--out", str(tmp_path / "m.ts")],
    ]
    codes, loaded, stderr = _run_without_extra(tmp_path, commands)
    assert codes == [0, 0, 0, 0, 0], stderr[-3000:]
    assert loaded == []
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["AP"] >= 0
    assert (tmp_path / "png" / "000001.png").is_file()


def test_a_command_that_needs_an_extra_says_how_to_install_it(tmp_path):
    cfg = load_config(CONFIGS / "synth_R18_uniinst.yaml", TINY)
    ckpt = save_checkpoint({"model": build_model(cfg.model).state_dict(), "config": to_dict(cfg)}, tmp_path / "m.pt")
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 48)).save(image)
    (tmp_path / "a.onnx").write_bytes(b"")
    commands = [
        ["prepare", "--json", str(tmp_path / "a.json"), "--images", str(tmp_path), "--out", str(tmp_path / "o")],
        ["evaluate", "--shards", str(tmp_path / "shards"), "--checkpoint", str(ckpt), "--out", str(tmp_path)],
        ["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx")],
        ["predict", str(image), "--checkpoint", str(tmp_path / "a.onnx"), "--backend", "onnx", "--out", str(tmp_path)],
    ]
    codes, _, stderr = _run_without_extra(tmp_path, commands)
    assert codes == [2, 2, 2, 2]
    lines = [line for line in stderr.splitlines() if line.startswith("uniinst ")]
    assert len(lines) == 4, stderr
    assert all("pip install 'uniinst[ray]'" in line for line in lines[:2]), stderr
    assert all("pip install 'uniinst[export]'" in line for line in lines[2:]), stderr
    assert not (tmp_path / "m.onnx").exists()
