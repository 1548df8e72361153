"""The Ray Train worker loop of the distill stage: one DeepSpeed engine per worker.

Each worker streams its own share of the train split (worker_segments: inputs and every teacher's
targets, read shard by shard, aligned by id), lets the strategy weigh the teachers, and trains
with the task's loss (task.train_step). Every epoch it validates, saves a DeepSpeed checkpoint and
reports it to Ray Train; the last report also carries the student's full fp32 state dict as
STUDENT_FILE, which the driver copies to trainer.output_dir. A worker that dies is replaced
(trainer.max_failures) and training resumes from the last reported checkpoint. The loop never
branches on the task or the strategy: both are looked up once.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ensemblekd.config import Config
from ensemblekd.errors import UserError
from ensemblekd.io import fs
from ensemblekd.mixing import build_strategy
from ensemblekd.models import build_module
from ensemblekd.store import Store
from ensemblekd.tasks import get_task, worker_segments

STUDENT_FILE = "student.pt"
STEP_METRICS = ("step", "loss", "ce_loss", "kd_loss", "lr", "samples_per_s")  # rank 0's per-step curve


# -- DeepSpeed -----------------------------------------------------------------------------------
def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(trainer) -> dict[str, Any]:
    """The generated DeepSpeed config, with trainer.deepspeed merged over it (user keys win)."""
    generated = {
        "train_batch_size": trainer.batch_size,
        "train_micro_batch_size_per_gpu": trainer.batch_size // trainer.num_workers,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": trainer.zero_stage},
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0: a silent clip, a norm and a second all-reduce per step
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return merge(generated, trainer.deepspeed)


def build_engine(cfg: Config, total_steps: int, store: Store):
    """The student (as the task wraps it: Task.student_module) in a DeepSpeed engine: AdamW and a
    per-step cosine decay unless trainer.deepspeed brings its own optimizer or scheduler."""
    import deepspeed

    skip_shm_comm_op()

    tr = cfg.trainer
    model = get_task(cfg.task).student_module(cfg, store, build_module(cfg.student.model, cfg.student.kwargs,
                                                                          "student.model"))
    ds_config = deepspeed_config(tr)
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(model.parameters(), lr=tr.lr, weight_decay=tr.weight_decay)
    scheduler = None if "scheduler" in ds_config else (lambda opt: torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))))
    with _stdout_shown_on_error():
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), optimizer=optimizer,
                                               lr_scheduler=scheduler, config=ds_config)
    return engine


def skip_shm_comm_op() -> None:
    """Keep DeepSpeed from compiling its shared-memory all-reduce op on CPU.

    deepspeed.comm's TorchBackend JIT-compiles deepspeed_shm_comm (30 s to 2.5 min in every new
    virtualenv, and a load on every worker start), after probing every op with compiler
    subprocesses, to serve inference_all_reduce (AutoTP inference) alone: training's all_reduce is
    torch.distributed's (gloo on CPU). build_shm_op skips the op when deepspeed.ops.__compatible_ops__
    marks it incompatible, the only place that dict is read; setting it first also skips the probe.
    """
    import deepspeed.ops

    vars(deepspeed.ops).setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False


@contextlib.contextmanager
def _stdout_shown_on_error() -> Iterator[None]:
    """Hold back what the block prints to stdout; show it, on stderr, only if the block raises.

    DeepSpeed print()s "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully" in
    every worker's deepspeed.initialize when it builds that op (deepspeed/comm/torch.py, build_shm_op:
    a bare print that no setting turns off; skip_shm_comm_op now keeps the op from being built, and
    this guard stays for any other bare print), and Ray forwards each worker's stdout to the console. Its logger
    (warnings) writes to the stream it was given at import, so it is not held back.
    """
    held = io.StringIO()
    try:
        with contextlib.redirect_stdout(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise


def all_reduce_sum(t: torch.Tensor, device) -> torch.Tensor:
    """Sum over workers; the tensor travels on the engine's device (NCCL needs CUDA tensors)."""
    import torch.distributed as dist

    t = t.to(device)
    dist.all_reduce(t)
    return t.cpu()


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """The student's full fp32 weights on CPU (gathered from all ranks under ZeRO-3): of the
    student alone where the task wrapped it (Task.student_module)."""
    import deepspeed

    student = getattr(engine.module, "student", engine.module)
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in student.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in student.state_dict().items()}


# -- one epoch -------------------------------------------------------------------------------------
def epoch_steps(train_rows: int, world: int, micro: int) -> int:
    """Steps per epoch: each of `world` workers takes train_rows // world rows in micro-batches."""
    return math.ceil((train_rows // world) / micro)


class Worker:
    """What one Ray Train worker holds for the whole run."""

    def __init__(self, cfg: Config, rank: int, world: int):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.task = get_task(cfg.task)
        self.names = [t.name for t in cfg.teachers]
        self.store = Store.open(cfg.store.uri)
        self.strategy = build_strategy(cfg.distill, self.names, self.store.val_accuracy(self.names), cfg.trainer.epochs)
        self.shard_rows = [s["rows"] for s in self.store.inputs("train")]
        self.micro = cfg.trainer.batch_size // cfg.trainer.num_workers
        self.steps_per_epoch = epoch_steps(sum(self.shard_rows), world, self.micro)
        self.terms: list[str] = []  # the loss's extra terms (KDLoss.terms), known from the first step
        if self.steps_per_epoch == 0:
            raise UserError(f"the train split has {sum(self.shard_rows)} rows, fewer than the {world} workers")

    def train_epoch(self, engine, epoch: int, counter) -> tuple[torch.Tensor, dict[str, list[float]]]:
        """Sums over this worker's steps (loss, ce, kd, rows, each of the loss's `terms`, then each
        teacher's weight) and rank 0's per-step curve; rank 0 tells `counter` (the driver's progress
        bar) its step twice a second."""
        tr = self.cfg.trainer
        engine.train()
        rng = np.random.default_rng([tr.seed, epoch, self.rank])
        segments = worker_segments(self.shard_rows, self.world, self.rank, tr.seed, epoch)
        sums = None
        steps: dict[str, list[float]] = {k: [] for k in STEP_METRICS}
        shown = 0.0
        batches = self.task.batches(self.cfg, self.store, "train", self.names, segments, self.micro, rng)
        for step, batch in enumerate(batches):
            tic = time.perf_counter()
            out, weights, n = self.task.train_step(engine, batch, self.strategy, self.cfg, epoch)
            engine.backward(out.loss)
            engine.step()
            row = torch.cat([torch.tensor([out.loss.item() * n, out.ce.item() * n, out.kd.item() * n, n,
                                           *(t.item() * n for t in out.terms.values())]),
                             weights.sum(0).detach().cpu()]).double()
            self.terms = list(out.terms)  # the same names at every step (the config says which)
            sums = row if sums is None else sums + row
            if self.rank == 0:
                for key, value in zip(STEP_METRICS, (epoch * self.steps_per_epoch + step, out.loss.item(), out.ce.item(),
                                                     out.kd.item(), engine.get_lr()[0],
                                                     n * self.world / max(time.perf_counter() - tic, 1e-9))):
                    steps[key].append(value)
            if counter is not None and (time.monotonic() - shown >= 0.5 or step + 1 == self.steps_per_epoch):
                counter.set.remote(epoch * self.steps_per_epoch + step + 1)  # not waited for
                shown = time.monotonic()
        return all_reduce_sum(sums, engine.device), steps

    @torch.no_grad()
    def accuracy(self, engine, split: str) -> float:
        """Top-1 accuracy over the whole split, each worker on its own slice, counts all-reduced.

        Every worker runs the same number of forward passes, padding with a forward on the split's
        first row whose result is not counted, since a ZeRO-3 forward is a collective.
        """
        engine.eval()
        rows = [s["rows"] for s in self.store.inputs(split)]
        slices = [worker_segments(rows, self.world, r, 0, 0, shuffle=False, drop_remainder=False)
                  for r in range(self.world)]
        steps = max(math.ceil(sum(stop - start for _, start, stop in s) / self.micro) for s in slices)
        batches = self.task.batches(self.cfg, self.store, split, [], slices[self.rank], self.micro, None)
        counts = torch.zeros(2, dtype=torch.float64)
        for _ in range(steps):
            batch = next(batches, None)
            if batch is None:
                self.task.count_correct(engine, self._first_row(split), self.cfg)
                continue
            counts += torch.tensor(self.task.count_correct(engine, batch, self.cfg), dtype=torch.float64)
        counts = all_reduce_sum(counts, engine.device)
        return counts[0].item() / max(counts[1].item(), 1.0)

    def _first_row(self, split: str):
        return next(self.task.batches(self.cfg, self.store, split, [], [(0, 0, 1)], 1, None))

    def metrics(self, epoch: int, sums: torch.Tensor, val_accuracy: float, seconds: float) -> dict[str, Any]:
        n, t = sums[3].item(), len(self.terms)
        metrics = {"epoch": epoch, "train_loss": sums[0].item() / n, "train_ce": sums[1].item() / n,
                   "train_kd": sums[2].item() / n, "val_accuracy": val_accuracy, "epoch_seconds": seconds,
                   **{f"train_{name}": sums[4 + i].item() / n for i, name in enumerate(self.terms)},
                   **{f"teacher_weight.{name}": sums[4 + t + k].item() / n for k, name in enumerate(self.names)}}
        stage = self.strategy.stage(epoch)
        if stage is not None:
            metrics["stage"] = stage
        return metrics


def train_loop(config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs (config: {"cfg": Config, "progress": a StepCounter
    actor of the driver's progress bar, or None})."""
    import logging

    try:
        _train(config)
    except UserError:
        # Bad input: the driver prints it as one line (stages.distill.StopOnBadInput ends the run);
        # Ray Train's worker would also log it with a traceback, through this logger.
        logging.getLogger("ray.train.v2._internal.util").setLevel(logging.CRITICAL)
        raise


def _train(config: dict[str, Any]) -> None:
    import ray
    import ray.train

    cfg: Config = config["cfg"]
    tr = cfg.trainer
    fs.configure_for(cfg)
    _quiet_report_log()
    ctx = ray.train.get_context()
    torch.set_num_threads(max(1, int(tr.cpus_per_worker)))
    torch.manual_seed(tr.seed)
    worker = Worker(cfg, ctx.get_world_rank(), ctx.get_world_size())
    engine = build_engine(cfg, worker.steps_per_epoch * tr.epochs, worker.store)

    start_epoch = 0
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as d:
            _, state = engine.load_checkpoint(os.path.join(d, "deepspeed"))
            start_epoch = int(state["epoch"]) + 1

    counter = config.get("progress") if worker.rank == 0 else None
    placement = {"rank": worker.rank, "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(), "pid": os.getpid()}
    for epoch in range(start_epoch, tr.epochs):
        t0 = time.perf_counter()
        sums, steps = worker.train_epoch(engine, epoch, counter)
        metrics = worker.metrics(epoch, sums, worker.accuracy(engine, "val"), time.perf_counter() - t0)
        if epoch == start_epoch and resume is not None:
            metrics["resumed_from_epoch"] = start_epoch
        if worker.rank == 0:
            metrics["steps"] = steps
        metrics["worker"] = placement
        state = full_state_dict(engine) if epoch == tr.epochs - 1 else None  # collective under ZeRO-3: every rank joins
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(os.path.join(tmp, "deepspeed"), tag=f"epoch-{epoch}", client_state={"epoch": epoch})
            if worker.rank == 0 and state is not None:
                torch.save(state, os.path.join(tmp, STUDENT_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _quiet_report_log() -> None:
    """Ray Train logs every report at INFO, rank-0 step curve included, through a logger named
    after its file (so ray.train.LoggingConfig does not reach it): keep it to warnings."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: the lines are only noise
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
