"""Every workaround for a behaviour of Ray or DeepSpeed, in one place, each with the versions it
was checked on (Ray 2.60, DeepSpeed 0.19.8, torch 2.13). When one of them is upgraded, this is the
file to re-read: each function says what it works around and where that lives upstream.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import sys
from collections.abc import Iterator


def skip_shm_comm_op() -> None:
    """Keep DeepSpeed from compiling its shared-memory all-reduce op on CPU (DeepSpeed 0.19).

    deepspeed.comm's TorchBackend JIT-compiles deepspeed_shm_comm (30 s to 2.5 min in every new
    virtualenv, and a load on every worker start), after probing every op with compiler
    subprocesses, to serve inference_all_reduce (AutoTP inference) alone: training's all_reduce is
    torch.distributed's (gloo on CPU). build_shm_op skips the op when deepspeed.ops.__compatible_ops__
    marks it incompatible, the only place that dict is read; setting it first also skips the probe.
    """
    import deepspeed.ops

    vars(deepspeed.ops).setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False


@contextlib.contextmanager
def stdout_shown_on_error() -> Iterator[None]:
    """Hold back what the block prints to stdout; show it, on stderr, only if the block raises.

    DeepSpeed 0.19 print()s "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully"
    in deepspeed.initialize when it builds that op (deepspeed/comm/torch.py, build_shm_op: a bare
    print that no setting turns off; skip_shm_comm_op keeps the op from being built, and this guard
    stays for any other bare print), and Ray forwards each worker's stdout to the console. Its
    logger (warnings) writes to the stream it was given at import, so it is not held back.
    """
    held = io.StringIO()
    try:
        with contextlib.redirect_stdout(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise


def quiet_ray_train_report_log() -> None:
    """Ray Train 2.60 logs every report at INFO, rank-0 step curve included, through a logger named
    after its file (ray/train/v2/_internal/execution/context.py), so ray.train.LoggingConfig does
    not reach it: keep it to warnings."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: the lines are only noise
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def quiet_ray_train_worker_error_log() -> None:
    """A bad input in a worker is printed by the driver as one line; Ray Train 2.60's worker would
    also log it with a traceback, through this logger (ray/train/v2/_internal/util.py)."""
    logging.getLogger("ray.train.v2._internal.util").setLevel(logging.CRITICAL)


def ray_train_driver_env() -> None:
    """Settings of Ray Train 2.60 that are read from the environment (RAY_TRAIN_* variables also
    reach the workers): its controller consumes reports once per health check (default 2 s), which
    with a short epoch, not training, would set the pace; and its print patch, which prefixes
    every print of a worker, is off (the stages print nothing there)."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


def deepspeed_on_cpu() -> None:
    """On a machine without CUDA, tell DeepSpeed its accelerator is the CPU: otherwise its first
    use (transformers' save_pretrained asks it about ZeRO-3) logs a warning the user cannot act on."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def single_process_group(use_gpu: bool) -> None:
    """A torch.distributed group of world size 1 in this process, for the worker loop run in the
    driver (trainer.num_workers: 0). Created once and kept for the life of the process: DeepSpeed
    0.19 caches its world group (deepspeed.utils.groups._WORLD_GROUP) and fails on a group destroyed
    and made anew. DeepSpeed also asserts LOCAL_RANK in the environment (engine
    _do_args_sanity_check), which its own launchers set."""
    import torch.distributed as dist

    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("LOCAL_RANK", "0")
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if use_gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
