import os

import pytest
import torch

from uniinst.engine.checkpoint import (
    checkpoint_name,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from uniinst.engine.lr_schedule import build_lr_scheduler, scaled_lr, warmup_multistep_factor


def test_warmup_is_linear_from_the_factor():
    kw = dict(warmup_iters=1000, warmup_factor=0.001, steps=(210000, 250000), gamma=0.1)
    assert warmup_multistep_factor(0, **kw) == pytest.approx(0.001)
    assert warmup_multistep_factor(500, **kw) == pytest.approx(0.001 * 0.5 + 0.5)
    assert warmup_multistep_factor(1000, **kw) == pytest.approx(1.0)


def test_steps_decay_by_gamma():
    kw = dict(warmup_iters=0, steps=(10, 20), gamma=0.1)
    assert [warmup_multistep_factor(i, **kw) for i in (9, 10, 19, 20)] == pytest.approx([1, 0.1, 0.1, 0.01])


def test_scheduler_follows_the_factor():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.02)
    sched = build_lr_scheduler(opt, warmup_iters=4, warmup_factor=0.25, steps=(6,), gamma=0.5)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.02 * warmup_multistep_factor(i, warmup_iters=4, warmup_factor=0.25, steps=(6,), gamma=0.5) for i in range(8)]
    assert lrs == pytest.approx(expected)
    assert lrs[5] == pytest.approx(0.02) and lrs[6] == pytest.approx(0.01)


def test_linear_scaling_rule():
    assert scaled_lr(0.01, 16, 16) == pytest.approx(0.01)
    assert scaled_lr(0.01, 4, 16) == pytest.approx(0.0025)


def test_checkpoint_is_atomic_and_pruned(tmp_path):
    save_checkpoint({"x": torch.arange(3)}, tmp_path / checkpoint_name(5))
    save_checkpoint({"x": torch.arange(4)}, tmp_path / checkpoint_name(10))
    (tmp_path / ".model_0000015.pt.123.tmp").write_bytes(b"half-written")  # a save killed midway
    assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_name(5), checkpoint_name(10)]
    prune_checkpoints(tmp_path, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_name(10)]
    assert torch.equal(load_checkpoint(tmp_path / checkpoint_name(10))["x"], torch.arange(4))


def test_failed_save_leaves_previous_checkpoint(tmp_path):
    path = tmp_path / checkpoint_name(1)
    save_checkpoint({"v": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        save_checkpoint({"v": Unpicklable()}, path)
    assert load_checkpoint(path)["v"] == 1
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


def test_corrupt_checkpoint_names_the_file(tmp_path):
    path = tmp_path / checkpoint_name(3)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=str(path)):
        load_checkpoint(path)


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(1)
    save_checkpoint({"rng": rng_state()}, tmp_path / "r.pt")
    a = (torch.rand(3), np.random.rand(2), random.random())
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    b = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
