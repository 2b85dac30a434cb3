"""One training process: forward, backward and optimiser step, the loop around them, and
the state a checkpoint holds.

The same :class:`Trainer` runs in a single process and in every worker of a distributed job:
the caller supplies the batches, wraps the model for DDP if it wants, and decides where
checkpoints and metrics go through the hook objects it gives :meth:`Trainer.run`.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from uniinst.config import ExperimentConfig, to_dict
from uniinst.engine.checkpoint import load_model_weights, rng_state, set_rng_state
from uniinst.engine.hooks import HookBase
from uniinst.engine.lr_schedule import build_lr_scheduler, scaled_lr
from uniinst.structures import Batch

logger = logging.getLogger(__name__)

_NORM_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available")
    return device


def build_optimizer(model: nn.Module, *, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with no weight decay on normalisation parameters (detectron2's default)."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if isinstance(module, _NORM_TYPES) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=lr, momentum=momentum)


class Trainer:
    """Model, optimiser, LR schedule and AMP scaler of one process.

    ``model`` is the plain module (checkpoints hold its weights); ``forward_model`` is what
    the step calls, for example the same module wrapped in DistributedDataParallel.
    ``world_size`` scales the LR with the global batch (linear scaling rule). ``meta``
    (for example the class names) is stored in every checkpoint.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: ExperimentConfig,
        *,
        device: torch.device,
        world_size: int = 1,
        forward_model: nn.Module | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.meta = dict(meta or {})
        self.forward_model = forward_model or model
        self.cfg = cfg
        self.device = device
        s = cfg.solver
        self.global_batch = cfg.data.batch_size * world_size
        self.base_lr = scaled_lr(s.base_lr, self.global_batch, s.reference_batch_size)
        self.optimizer = build_optimizer(model, lr=self.base_lr, momentum=s.momentum, weight_decay=s.weight_decay)
        self.scheduler = build_lr_scheduler(
            self.optimizer, warmup_iters=s.warmup_iters, warmup_factor=s.warmup_factor, steps=s.steps, gamma=s.gamma
        )
        self.amp = s.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.iteration = 0
        self.max_iter = cfg.solver.max_iter

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self, batch: Batch) -> dict[str, float]:
        """One iteration on ``batch``; returns the loss terms and the LR used."""
        self.forward_model.train()
        batch = batch.to(self.device)
        with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.amp):
            losses = self.forward_model(batch.images, batch.image_sizes, batch.targets)
        total = sum(losses.values())
        if not torch.isfinite(total):
            parts = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            raise FloatingPointError(f"non-finite loss at iteration {self.iteration}: {parts}")
        lr = self.lr
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        clip = self.cfg.solver.clip_grad_norm
        if clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.iteration += 1
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["loss"] = float(total.detach())
        out["lr"] = lr
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "global_batch": self.global_batch,
            "rng": rng_state(),
            "config": to_dict(self.cfg),
            "meta": self.meta,
        }

    def load_state_dict(self, state: Mapping[str, Any], *, source: str = "the checkpoint") -> None:
        load_model_weights(self.model, state, source)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        # The LR follows this run's global batch (the linear scaling rule), also when the
        # checkpoint was written by a worker group of another size.
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        self.scheduler.base_lrs = [self.base_lr] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.base_lr
            group["lr"] = self.base_lr * factor
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        if "rng" in state:
            set_rng_state(state["rng"])

    def run(self, batches: Iterable[Batch], hooks: Sequence[HookBase] = (), *, max_iter: int | None = None) -> None:
        """Train from the current iteration to ``max_iter`` (default ``solver.max_iter``),
        calling every hook, in order, after every step (:mod:`uniinst.engine.hooks`)."""
        self.max_iter = self.cfg.solver.max_iter if max_iter is None else max_iter
        it: Iterator[Batch] = iter(batches)
        for hook in hooks:
            hook.before_train(self)
        while self.iteration < self.max_iter:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                raise RuntimeError(f"the data ran out at iteration {self.iteration} of {self.max_iter}") from None
            t1 = time.perf_counter()
            metrics = self.step(batch)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t2 = time.perf_counter()
            metrics["data_time"] = t1 - t0
            metrics["step_time"] = t2 - t1
            metrics["images_per_sec"] = len(batch) / max(t2 - t0, 1e-9)
            for hook in hooks:
                hook.after_step(self, metrics)


def format_progress(iteration: int, max_iter: int, metrics: Mapping[str, float]) -> str:
    """One progress line: iteration, losses, LR, throughput and time left."""
    losses = "  ".join(
        f"{k.removeprefix('loss_')} {v:.3f}" for k, v in metrics.items() if k.startswith("loss_")
    )
    eta = metrics.get("eta_seconds", math.nan)
    eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
    return (
        f"iter {iteration}/{max_iter}  loss {metrics['loss']:.3f} ({losses})  lr {metrics['lr']:.2e}  "
        f"{metrics['images_per_sec']:.1f} img/s  data {metrics['data_time'] * 1000:.0f} ms  eta {eta_text}"
    )
