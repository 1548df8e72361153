"""The Ray Train worker loop of the distill stage: one DeepSpeed engine per worker.

Each worker streams its own share of the train split (worker_segments: inputs and every teacher's
targets, read shard by shard, aligned by id), lets the strategy weigh the teachers, and trains
with the task's loss (task.train_step). Every epoch it validates, saves a DeepSpeed checkpoint and
reports it to Ray Train; the last report also carries the student's full fp32 state dict as
STUDENT_FILE, which the driver copies to trainer.output_dir. A worker that dies is replaced
(trainer.max_failures) and training resumes from the last reported checkpoint. The loop never
branches on the task or the strategy: both are looked up once.

Where it runs is a Session: a Ray Train worker (RayTrainSession), or the driver's own process
with trainer.num_workers: 0 (InProcessSession: one process, no checkpoints, no restarts; what
tests of a loss, a strategy or a feature term use, and a laptop run may too).
"""

from __future__ import annotations

import copy
import math
import os
import socket
import tempfile
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from ensemblekd.config import Config
from ensemblekd.errors import UserError
from ensemblekd.io import compat, fs
from ensemblekd.mixing import build_strategy
from ensemblekd.models import build_student
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
        "train_micro_batch_size_per_gpu": trainer.batch_size // trainer.world_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": trainer.zero_stage},
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0: a silent clip, a norm and a second all-reduce per step
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return merge(generated, trainer.deepspeed)


def build_engine(cfg: Config, total_steps: int, store: Store):
    """The student (as the task wraps it: Task.student_module) in a DeepSpeed engine: AdamW and a
    per-step cosine decay (after trainer.warmup) unless trainer.deepspeed brings its own optimizer or scheduler."""
    import deepspeed

    compat.skip_shm_comm_op()

    tr = cfg.trainer
    model = get_task(cfg.task).student_module(cfg, store, build_student(cfg.student))
    ds_config = deepspeed_config(tr)
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(model.parameters(), lr=tr.lr, weight_decay=tr.weight_decay)
    scheduler = None if "scheduler" in ds_config else (lambda opt: torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(step, total_steps, tr.warmup)))
    with compat.stdout_shown_on_error():
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), optimizer=optimizer,
                                               lr_scheduler=scheduler, config=ds_config)
    return engine


def lr_factor(step: int, total_steps: int, warmup: float = 0.0) -> float:
    """The learning rate's multiplier at a step: a linear rise over the first `warmup` share of the
    steps (a transformer trained from scratch collapses to the commonest class without one), then
    a cosine decay to 0 over the rest."""
    rise = int(warmup * total_steps)
    if step < rise:
        return (step + 1) / rise
    return 0.5 * (1 + math.cos(math.pi * min(step - rise, total_steps - rise) / max(total_steps - rise, 1)))


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
        self.micro = cfg.trainer.batch_size // cfg.trainer.world_size
        self.steps_per_epoch = epoch_steps(sum(self.shard_rows), world, self.micro)
        self.terms: list[str] = []  # the loss's extra terms (KDLoss.terms), known from the first step
        if self.steps_per_epoch == 0:
            raise UserError(f"the train split has {sum(self.shard_rows)} rows, fewer than the {world} workers")

    def train_epoch(self, engine, epoch: int, progress: Callable[[int], None]) -> tuple[torch.Tensor, dict[str, list[float]]]:
        """Sums over this worker's steps (loss, ce, kd, rows, each of the loss's `terms`, then each
        teacher's weight) and rank 0's per-step curve; tells `progress` (the driver's progress bar)
        its step twice a second."""
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
            if time.monotonic() - shown >= 0.5 or step + 1 == self.steps_per_epoch:
                progress(epoch * self.steps_per_epoch + step + 1)
                shown = time.monotonic()
        assert sums is not None  # steps_per_epoch >= 1 (Worker.__init__): at least one batch
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


# -- where the loop runs ------------------------------------------------------------------------------
class Session(Protocol):
    """What the loop needs from where it runs: a Ray Train worker (RayTrainSession) or the driver's
    own process (InProcessSession, trainer.num_workers: 0)."""

    rank: int
    world: int

    def progress(self, step: int) -> None: ...

    def placement(self) -> dict[str, Any]: ...

    def resume(self, engine) -> int:
        """Load the last reported checkpoint into the engine, if any; the epoch to start at."""

    def report(self, metrics: dict[str, Any], save_checkpoint: Callable[[str], None],
               student: dict[str, torch.Tensor] | None) -> None:
        """One epoch's metrics; `save_checkpoint(directory)` writes the engine's checkpoint there;
        `student` (the last epoch's) is the student's full state dict."""


def run_worker(cfg: Config, session: Session) -> None:
    """The whole run of one worker: build the engine, resume, and train, validate and report each epoch."""
    tr = cfg.trainer
    fs.configure_for(cfg)
    torch.manual_seed(tr.seed)
    worker = Worker(cfg, session.rank, session.world)
    engine = build_engine(cfg, worker.steps_per_epoch * tr.epochs, worker.store)
    start_epoch = session.resume(engine)
    for epoch in range(start_epoch, tr.epochs):
        t0 = time.perf_counter()
        sums, steps = worker.train_epoch(engine, epoch, session.progress)
        metrics = worker.metrics(epoch, sums, worker.accuracy(engine, "val"), time.perf_counter() - t0)
        if epoch == start_epoch and start_epoch > 0:
            metrics["resumed_from_epoch"] = start_epoch
        if worker.rank == 0:
            metrics["steps"] = steps
        metrics["worker"] = session.placement()
        state = full_state_dict(engine) if epoch == tr.epochs - 1 else None  # collective under ZeRO-3: every rank joins
        # ignored: mypy cannot infer a lambda with a default (epoch bound) as Callable[[str], None]
        session.report(metrics, lambda d, epoch=epoch: engine.save_checkpoint(  # type: ignore[misc]
            os.path.join(d, "deepspeed"), tag=f"epoch-{epoch}", client_state={"epoch": epoch}), state)


class RayTrainSession:
    """A Ray Train worker: rank and world from its context, a checkpoint reported each epoch (the
    last with STUDENT_FILE, rank 0's), resumed from after a restart; rank 0 moves the driver's
    progress bar through `counter` (a StepCounter actor, or None)."""

    def __init__(self, counter):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.counter = counter if self.rank == 0 else None

    def progress(self, step: int) -> None:
        if self.counter is not None:
            self.counter.set.remote(step)  # not waited for

    def placement(self) -> dict[str, Any]:
        import ray

        return {"rank": self.rank, "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
                "pid": os.getpid()}

    def resume(self, engine) -> int:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return 0
        with checkpoint.as_directory() as d:
            _, state = engine.load_checkpoint(os.path.join(d, "deepspeed"))
        return int(state["epoch"]) + 1

    def report(self, metrics, save_checkpoint, student) -> None:
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(tmp)
            if self.rank == 0 and student is not None:
                torch.save(student, os.path.join(tmp, STUDENT_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


class InProcessSession:
    """The loop in the driver's own process (trainer.num_workers: 0): world size 1, nothing to
    resume from and no checkpoint written (there is no worker to restart); each report goes to
    `on_report` at once, as a Ray Train callback would get it, and the last one's student is kept."""

    rank, world = 0, 1

    def __init__(self, on_report: Callable[[list[dict[str, Any]]], None], progress: Callable[[int], None]):
        self.on_report, self.progress = on_report, progress
        self.metrics: dict[str, Any] = {}
        self.student: dict[str, torch.Tensor] | None = None

    def placement(self) -> dict[str, Any]:
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
        return {"rank": 0, "node_id": node, "host": socket.gethostname(), "pid": os.getpid()}

    def resume(self, engine) -> int:
        return 0

    def report(self, metrics, save_checkpoint, student) -> None:
        self.on_report([metrics])
        self.metrics = metrics
        if student is not None:
            self.student = student


def run_in_process(cfg: Config, session: InProcessSession) -> None:
    """run_worker in this process, on a torch.distributed group of one; torch's thread count is
    set for the run (trainer.cpus_per_worker) and restored after."""
    compat.single_process_group(cfg.trainer.use_gpu)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.trainer.cpus_per_worker)))
    try:
        run_worker(cfg, session)
    finally:
        torch.set_num_threads(threads)


def train_loop(config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs (config: {"cfg": Config, "progress": a StepCounter
    actor of the driver's progress bar, or None})."""
    try:
        cfg: Config = config["cfg"]
        compat.quiet_ray_train_report_log()
        torch.set_num_threads(max(1, int(cfg.trainer.cpus_per_worker)))
        run_worker(cfg, RayTrainSession(config.get("progress")))
    except UserError:
        compat.quiet_ray_train_worker_error_log()  # the driver prints it as one line (distill.StopOnBadInput)
        raise
