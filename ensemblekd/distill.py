"""The distill stage: Ray Train workers, each running a DeepSpeed engine, learn from the store.

Each worker streams its own share of the train split (inputs and every teacher's logits, read
shard by shard and zipped row for row by id), mixes the teachers' targets with the configured
strategy, and trains with the Hinton loss (losses.kd_loss). Every epoch it validates, saves a
DeepSpeed checkpoint and reports it to Ray Train; the last report also carries the student's
full fp32 state dict as `student.pt`, which the driver copies to trainer.output_dir.
A worker that dies is replaced (trainer.max_failures) and training resumes from the last
reported checkpoint. Workers never write MLflow: each report reaches the driver's run through
a Ray Train callback on the driver's node (MlflowLogger).
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from ray.train import UserCallback

from ensemblekd import storage
from ensemblekd.config import Config
from ensemblekd.data import InputShard, read_shard
from ensemblekd.errors import UserError
from ensemblekd.losses import kd_loss
from ensemblekd.store import Store
from ensemblekd.weighting import build_strategy

STUDENT_FILE = "student.pt"


# -- data: each worker's share, streamed -----------------------------------------------------
def worker_segments(shard_rows: list[int], num_workers: int, rank: int, seed: int, epoch: int,
                    shuffle: bool = True, drop_remainder: bool = True) -> list[tuple[int, int, int]]:
    """This worker's rows of an epoch as (shard, start, stop) segments.

    Shards are put in a seeded order for the epoch and their rows concatenated; worker r takes
    the r-th contiguous slice, so workers never overlap and each reads only the shards its
    slice touches. With drop_remainder every worker gets floor(N / W) rows (equal step counts,
    which data-parallel training needs); the few rows left over differ from epoch to epoch.
    """
    order = list(range(len(shard_rows)))
    if shuffle:
        np.random.default_rng([seed, epoch]).shuffle(order)
    total = sum(shard_rows)
    if drop_remainder:
        per = total // num_workers
        lo, hi = rank * per, (rank + 1) * per
    else:
        lo, hi = rank * total // num_workers, (rank + 1) * total // num_workers
    segments, pos = [], 0
    for s in order:
        start, stop = max(lo, pos), min(hi, pos + shard_rows[s])
        if start < stop:
            segments.append((s, start - pos, stop - pos))
        pos += shard_rows[s]
    return segments


def read_rows(cfg: Config, store: Store, split: str, shard: int, teachers: list[str]):
    """(x [N, F], y [N], teacher logits [N, K, C]) of one input shard, alignment checked by id."""
    d = cfg.data
    ids, x, y = read_shard(InputShard(**store.inputs(split)[shard]), d.features, d.label, d.id, writable=False)
    stacked = []
    for name in teachers:
        t_ids, logits = store.read(split, name, shard)
        if not np.array_equal(t_ids, ids):
            raise UserError(f"{store.uri}: {split} shard {shard} of teacher '{name}' is not aligned with its input "
                            "(ids differ); the input changed since labelling: re-run label")
        stacked.append(logits)
    z = np.stack(stacked, axis=1) if stacked else np.zeros((len(y), 0, 0), np.float32)
    return x, y, z


def iter_batches(cfg: Config, store: Store, split: str, teachers: list[str], segments, batch_size: int,
                 rng: np.random.Generator | None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches of (x, y, teacher_logits) over the segments; memory is one shard plus one batch.

    Batches are slices of the current shard; only a batch that spans two shards is copied
    together (re-concatenating the rest of a shard for every batch cost ~40% of an epoch).
    """
    carry: tuple[np.ndarray, ...] | None = None  # the start of a batch, from the previous shard
    for shard, start, stop in segments:
        x, y, z = (a[start:stop] for a in read_rows(cfg, store, split, shard, teachers))
        if rng is not None:
            perm = rng.permutation(len(y))
            x, y, z = x[perm], y[perm], z[perm]
        pos = 0
        if carry is not None:
            pos = batch_size - len(carry[1])
            x0, y0, z0 = (np.concatenate([c, a[:pos]]) for c, a in zip(carry, (x, y, z)))
            carry = None
            if len(y0) < batch_size:  # this shard was too short to fill it: carry on
                carry = (x0, y0, z0)
                continue
            yield _tensors(x0, y0, z0)
        while pos + batch_size <= len(y):
            yield _tensors(x[pos:pos + batch_size], y[pos:pos + batch_size], z[pos:pos + batch_size])
            pos += batch_size
        if pos < len(y):
            carry = (x[pos:], y[pos:], z[pos:])
    if carry is not None:
        yield _tensors(*carry)


def _tensors(x, y, z):
    """Tensors of one batch: views where the batch is a writable contiguous slice (the shuffled
    shard), a copy otherwise (an unshuffled slice of Arrow's read-only buffer)."""
    def own(a: np.ndarray) -> np.ndarray:
        return a if a.flags.writeable and a.flags.c_contiguous else np.array(a)

    return torch.from_numpy(own(x)), torch.from_numpy(own(y)), torch.from_numpy(z.astype(np.float32))


def strategy_for(cfg: Config, store: Store, ensemble: bool = False):
    """The configured strategy, given what rules may need from the store (validation accuracy).

    ensemble=True: all teachers at once with the configured weighting (the ensemble a sequential
    or assistant run compresses, without its stages or levels), for evaluation.
    """
    names = [t.name for t in cfg.teachers]
    val_accuracy = {n: store.teacher(n).get("val_accuracy") for n in names}
    needs_accuracy = cfg.distill.weighting == "accuracy" or cfg.distill.order != "config"
    if needs_accuracy and None in val_accuracy.values():
        raise UserError("distill: weighting 'accuracy' and order by accuracy need each teacher's validation accuracy, "
                        "and the val split has no labels; give data.val a label column or choose another rule")
    distill_cfg = cfg.distill.model_copy(update={"strategy": "parallel"}) if ensemble else cfg.distill
    return build_strategy(distill_cfg, names, val_accuracy, epochs=cfg.trainer.epochs)


# -- DeepSpeed -----------------------------------------------------------------------------
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


# -- the per-worker loop ---------------------------------------------------------------------
def train_step(engine, batch, strategy, cfg: Config, epoch: int):
    """(KDLoss, teacher weights [B, K], rows) of one classification micro-batch, not yet stepped."""
    x, y, z = (t.to(engine.device) for t in batch)
    targets, weights = strategy.targets(z, y, cfg.distill.temperature, epoch)
    return kd_loss(engine(x), targets, y, cfg.distill.temperature, cfg.distill.alpha), weights, len(y)


def train_loop(config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train

    from ensemblekd.teachers import build_model

    cfg: Config = config["cfg"]
    storage.configure_for(cfg)
    token = cfg.task == "token"
    if token:
        from ensemblekd import token_pipeline
    tr = cfg.trainer
    _quiet_report_log()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(tr.cpus_per_worker)))
    torch.manual_seed(tr.seed)
    names = [t.name for t in cfg.teachers]
    store = Store.open(cfg.store.uri)
    strategy = strategy_for(cfg, store)
    shard_rows = [s["rows"] for s in store.inputs("train")]
    micro = tr.batch_size // tr.num_workers
    steps_per_epoch = math.ceil((sum(shard_rows) // world) / micro)
    if steps_per_epoch == 0:
        raise UserError(f"the train split has {sum(shard_rows)} rows, fewer than the {world} workers")

    model = build_model(cfg.student.model, cfg.student.kwargs, "student.model")
    ds_config = deepspeed_config(tr)
    client_optimizer = None
    if "optimizer" not in ds_config:
        client_optimizer = torch.optim.AdamW(model.parameters(), lr=tr.lr, weight_decay=tr.weight_decay)
    total_steps = steps_per_epoch * tr.epochs
    scheduler = None if "scheduler" in ds_config else (lambda opt: torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), optimizer=client_optimizer,
                                           lr_scheduler=scheduler, config=ds_config)
    device = engine.device

    start_epoch = 0
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as d:
            _, state = engine.load_checkpoint(os.path.join(d, "deepspeed"))
            start_epoch = int(state["epoch"]) + 1

    bar = _progress(rank, steps_per_epoch * (tr.epochs - start_epoch)) if config.get("progress", True) else None
    val_rows = [s["rows"] for s in store.inputs("val")]
    for epoch in range(start_epoch, tr.epochs):
        engine.train()
        rng = np.random.default_rng([tr.seed, epoch, rank])
        segments = worker_segments(shard_rows, world, rank, tr.seed, epoch)
        sums = torch.zeros(4 + len(names), dtype=torch.float64)  # loss, ce, kd, rows, weight per teacher
        steps: dict[str, list[float]] = {k: [] for k in STEP_METRICS}  # rank 0's per-step curve, sent with the report
        t0 = time.perf_counter()
        batches = (token_pipeline.iter_batches if token else iter_batches)(cfg, store, "train", names, segments, micro, rng)
        for step, batch in enumerate(batches):
            tic = time.perf_counter()
            out, weights, n = (token_pipeline.train_step if token else train_step)(engine, batch, strategy, cfg, epoch)
            engine.backward(out.loss)
            engine.step()
            sums += torch.cat([torch.tensor([out.loss.item() * n, out.ce.item() * n, out.kd.item() * n, n]),
                               weights.sum(0).detach().cpu()]).double()
            if rank == 0:
                for key, value in zip(STEP_METRICS, (epoch * steps_per_epoch + step, out.loss.item(), out.ce.item(),
                                                     out.kd.item(), engine.get_lr()[0],
                                                     n * world / max(time.perf_counter() - tic, 1e-9))):
                    steps[key].append(value)
            if bar:
                bar.update(1)
        sums = all_reduce_sum(sums, device)
        val_acc = evaluate_split(cfg, store, engine, "val", val_rows, rank, world, micro)
        metrics = {"epoch": epoch, "train_loss": sums[0].item() / sums[3].item(), "train_ce": sums[1].item() / sums[3].item(),
                   "train_kd": sums[2].item() / sums[3].item(), "val_accuracy": val_acc,
                   "epoch_seconds": time.perf_counter() - t0,
                   **{f"teacher_weight.{name}": sums[4 + k].item() / sums[3].item() for k, name in enumerate(names)}}
        if hasattr(strategy, "stage"):
            metrics["stage"] = strategy.stage(epoch)
        if epoch == start_epoch and resume is not None:
            metrics["resumed_from_epoch"] = start_epoch
        if rank == 0:
            metrics["steps"] = steps
        last = epoch == tr.epochs - 1
        state = full_state_dict(engine) if last else None  # collective under ZeRO-3: every rank joins
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(os.path.join(tmp, "deepspeed"), tag=f"epoch-{epoch}", client_state={"epoch": epoch})
            if rank == 0 and state is not None:
                torch.save(state, os.path.join(tmp, STUDENT_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    if bar:
        bar.close()


def _quiet_report_log() -> None:
    """Ray Train logs every report at INFO, rank-0 step curve included, through a logger named
    after its file (so ray.train.LoggingConfig does not reach it): keep it to warnings."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: the lines are only noise
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


@torch.no_grad()
def evaluate_split(cfg, store, engine, split, rows, rank, world, micro) -> float:
    """Accuracy over the whole split, each worker on its own slice, counts all-reduced.

    Every worker runs the same number of forward passes (padding with empty batches), since a
    ZeRO-3 forward is a collective.
    """
    engine.eval()
    segments = worker_segments(rows, world, rank, 0, 0, shuffle=False, drop_remainder=False)
    max_rows = max(sum(s[2] - s[1] for s in worker_segments(rows, world, r, 0, 0, False, False)) for r in range(world))
    if cfg.task == "token":
        from ensemblekd.token_pipeline import next_token_counts

        counts = all_reduce_sum(next_token_counts(cfg, store, engine, split, segments, micro, math.ceil(max_rows / micro)),
                                engine.device)
        return counts[0].item() / max(counts[1].item(), 1.0)
    batches = list(iter_batches(cfg, store, split, [], segments, micro, None))
    in_features = batches[0][0].shape[1] if batches else None
    counts = torch.zeros(2, dtype=torch.float64)
    for i in range(math.ceil(max_rows / micro)):
        if i < len(batches):
            x, y, _ = batches[i]
        else:
            x, y = torch.zeros(0, in_features or 1), torch.zeros(0, dtype=torch.long)
        pred = engine(x.to(engine.device)).argmax(-1).cpu()
        keep = y >= 0
        counts += torch.tensor([(pred[keep] == y[keep]).sum().item(), keep.sum().item()], dtype=torch.float64)
    counts = all_reduce_sum(counts, engine.device)
    return counts[0].item() / max(counts[1].item(), 1.0)


def all_reduce_sum(t: torch.Tensor, device) -> torch.Tensor:
    """Sum over workers; the tensor travels on the engine's device (NCCL needs CUDA tensors)."""
    import torch.distributed as dist

    t = t.to(device)
    dist.all_reduce(t)
    return t.cpu()


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """The student's full fp32 weights on CPU (gathered from all ranks under ZeRO-3)."""
    import deepspeed

    module = engine.module
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def _progress(rank: int, total: int):
    if rank != 0:
        return None
    from ray.experimental.tqdm_ray import tqdm

    return tqdm(total=total, desc="distill", unit="step")


STEP_METRICS = ("step", "loss", "ce_loss", "kd_loss", "lr", "samples_per_s")


class MlflowLogger(UserCallback):
    """Logs each epoch's report into the driver's MLflow run, from Ray Train's controller.

    The controller runs on the driver's node, so tracking never depends on a worker's disk or
    network, and it sees a report only once every worker has made it and its checkpoint is
    persisted: an epoch re-run after a worker failure was never reported, so no epoch is logged
    twice. Rank 0 sends its per-step curve along in the report ("steps").
    """

    def __init__(self, mlflow_info: dict[str, str]):
        self.info = mlflow_info

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        report = dict(metrics[0])
        steps, epoch, now = report.pop("steps", {}), report.pop("epoch"), int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(epoch)) for k, v in report.items() if v is not None]
        for i, step in enumerate(steps.get("step", [])):
            batch += [Metric(k, float(steps[k][i]), now, int(step)) for k in STEP_METRICS[1:]]
        client = MlflowClient(self.info["tracking_uri"])
        for i in range(0, len(batch), 1000):
            client.log_batch(self.info["run_id"], metrics=batch[i:i + 1000])


# -- the driver side -------------------------------------------------------------------------
def distill(cfg: Config, mlflow_info: dict[str, str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the Ray Train job; returns the final metrics and the student's path."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from ensemblekd.ray_session import ensure_ray, require

    strategy = preflight(cfg)
    if mlflow_info and hasattr(strategy, "describe"):
        from mlflow.tracking import MlflowClient

        MlflowClient(mlflow_info["tracking_uri"]).set_tag(mlflow_info["run_id"], "ensemblekd.stages", strategy.describe())
    ensure_ray(cfg.ray)
    tr = cfg.trainer
    require("trainer.cpus_per_worker/use_gpu", tr.cpus_per_worker, 1.0 if tr.use_gpu else 0.0)
    # Ray Train's controller consumes reports once per health check (default 2 s): with a short
    # epoch that, not training, would set the pace. RAY_TRAIN_* variables reach the workers.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg, "progress": progress},
        scaling_config=ray.train.ScalingConfig(num_workers=tr.num_workers, use_gpu=tr.use_gpu,
                                               resources_per_worker={"CPU": tr.cpus_per_worker, **({"GPU": 1} if tr.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=f"distill-{int(time.time())}",
            storage_path=storage.join(tr.output_dir, "ray_train"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=tr.max_failures),
            callbacks=[MlflowLogger(mlflow_info)] if mlflow_info else None,
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}} if not tr.use_gpu else None,
        ),
    )
    start = time.perf_counter()
    try:
        result = trainer.fit()
    except ray.train.WorkerGroupError as exc:
        for failure in exc.worker_failures.values():  # a bad input on a worker stays a one-line error
            cause = getattr(failure, "cause", failure)
            if isinstance(cause, UserError):
                raise UserError(str(cause)) from None
        raise
    seconds = time.perf_counter() - start
    student_uri = storage.join(tr.output_dir, STUDENT_FILE)
    with result.checkpoint.as_directory() as d:
        storage.write_bytes_atomic(student_uri, open(os.path.join(d, STUDENT_FILE), "rb").read())
    metrics = {k: v for k, v in result.metrics.items() if k != "steps"}
    return {"metrics": metrics, "student": student_uri, "seconds": seconds}


def preflight(cfg: Config):
    """Everything distill can check in the driver, before any worker starts: the store is
    complete for the configured teachers, and the student builds and fits the data and classes.
    Returns the strategy."""
    from ensemblekd.teachers import build_model

    store = Store.open(cfg.store.uri)
    for split in ("train", "val"):
        store.check_complete(split, [t.name for t in cfg.teachers])
        store.check_sizes(split, [t.name for t in cfg.teachers])
    strategy = strategy_for(cfg, store)
    if cfg.task == "token":
        from ensemblekd.token_pipeline import preflight as token_preflight

        token_preflight(cfg, store)
        return strategy
    model = build_model(cfg.student.model, cfg.student.kwargs, "student.model")
    shard = InputShard(**store.inputs("val")[0])
    _, x, _ = read_shard(shard, cfg.data.features, None, cfg.data.id)
    try:
        with torch.no_grad():
            out = model(torch.from_numpy(x[:2]))
    except RuntimeError as exc:
        raise UserError(f"student.model: fails on the data ({str(exc).splitlines()[0]}); check its kwargs") from None
    if out.shape[-1] != store.num_classes:
        raise UserError(f"student.model: outputs {out.shape[-1]} classes but the teachers have {store.num_classes}; fix student.kwargs")
    return strategy
