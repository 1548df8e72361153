"""Ray, started on first use: a run with no Ray work to do (a complete store, a bad config)
never pays for, or prints, a Ray start. Also: resource requests no node can meet are refused, and
a UserError raised inside a Ray task or actor comes back to the driver as itself."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ensemblekd.errors import UserError
from ensemblekd.io import fs


def ensure_ray(ray_cfg, node_paths: dict[str, str] | None = None) -> None:
    """Join ray.address (or RAY_ADDRESS), or start a local Ray with ray.num_cpus, unless connected;
    then refuse node-local `node_paths` (config key -> URI) on a cluster of several nodes (see
    check_paths_reach_every_node).

    With neither set, address "local" forces a fresh local Ray: a bare ray.init() would join
    whatever cluster `ray start` last started on this machine. An address where no Ray listens,
    or whose cluster refuses us (token authentication), is a one-line UserError.
    """
    import ray

    if not ray.is_initialized():
        _connect(ray_cfg)
    check_paths_reach_every_node(node_paths or {}, ray_cfg.shared_filesystem)


def _connect(ray_cfg) -> None:
    import ray

    env = os.environ.get("RAY_ADDRESS") or None
    address = ray_cfg.address or env
    kwargs: dict[str, Any] = {"address": address, "logging_level": logging.WARNING,
                              "logging_config": ray.LoggingConfig(log_level="WARNING")}
    if address is None:
        # A fresh one-node Ray. Ray turns token authentication on for it, and logs a WARNING
        # saying so ("Token authentication is enabled for this Ray cluster. Set
        # RAY_AUTH_MODE=disabled to opt out") unless RAY_AUTH_MODE is set; it cannot be set
        # here (Ray reads it when imported: set later to "token", ray.init fails), so that one
        # logger keeps to errors.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # No node of a one-node Ray is ever drained: Ray Train's preemption watcher would only cost
        # an actor and log a C++ "E" line (core_worker.cc, ray-project/ray#53727) from its
        # controller. Read by the controller, which gets the driver's RAY_TRAIN_* variables; a
        # cluster (ray.address) keeps it, and so does a user who set it.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Ray's state API, used inside this Ray's own workers (Ray Train's PlacementGroupCleaner
        # actor polls is_actor_alive -> ray.util.state.get_actor with no address), finds its cluster
        # from RAY_ADDRESS, else by scanning the host: ray/dashboard/utils.py
        # ray_address_to_api_server_url -> ray/_private/services.py canonicalize_bootstrap_address_or_die
        # takes the last `ray start` cluster (/tmp/ray/ray_current_cluster) or the one gcs_server
        # running. With another Ray on this host that is the wrong cluster ("Found multiple active
        # Ray instances": a traceback from its monitor thread, or a cleaner that finds no controller
        # and quits, or removes the run's placement group). The workers' RAY_ADDRESS pins it to this
        # Ray; it is known only once Ray is up, so each worker sets it itself (_local_worker_setup). The
        # driver's own RAY_ADDRESS stays unset: a later ensure_ray in this process starts a new Ray.
        kwargs.update(address="local", num_cpus=ray_cfg.num_cpus,
                      runtime_env={"worker_process_setup_hook": f"{__name__}._local_worker_setup"})
        ray.init(**kwargs)
        return
    # As in Ray, "auto" means RAY_ADDRESS when that is set (it is, inside `ray job submit`).
    key, target = ("ray.address", address) if ray_cfg.address and not (address == "auto" and env) else ("RAY_ADDRESS", env)
    where = f"{key}={target}"
    assert target is not None  # address is not None here, so one of ray.address and RAY_ADDRESS is set
    _check_listening(target, where)
    try:
        ray.init(**kwargs)
    except (ConnectionError, ray.exceptions.AuthenticationError) as exc:
        hint = "" if os.environ.get("RAY_AUTH_MODE") == "token" else (
            "; if the cluster has token authentication on, set RAY_AUTH_MODE=token and its token "
            "(RAY_AUTH_TOKEN, or the file ~/.ray/auth_token)")
        raise UserError(f"{where}: cannot join the Ray cluster ({' '.join(str(exc).split())}){hint}") from None


def check_paths_reach_every_node(node_paths: dict[str, str], shared_filesystem: bool) -> None:
    """On a Ray cluster of several nodes, a local path names a different disk on each node: a shard
    one node writes is missing on the next, and checkpoints vanish with their node. Refuse the first
    such path, unless the user says it is a filesystem mounted at the same path on every node."""
    import ray

    if shared_filesystem or not node_paths:
        return
    local = [(key, uri) for key, uri in node_paths.items() if not fs.is_object_store(uri)]
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if local and nodes > 1:
        key, uri = local[0]
        more = f" (and {len(local) - 1} more local path{'s' * (len(local) > 2)})" if len(local) > 1 else ""
        raise UserError(f"{key}={uri}: a local path, but this Ray cluster has {nodes} nodes, each with its own disk"
                        f"{more}; use object storage (s3://...) or, if it is a filesystem mounted at the same path "
                        "on every node, set ray.shared_filesystem=true")


def _local_worker_setup() -> None:
    """Run in each worker of a local Ray as it starts (see ensure_ray): RAY_ADDRESS is this Ray.

    Also: Ray Train's controller asks an autoscaling coordinator actor for the workers' resources
    and gives it 5 s to answer; on a busy laptop its first start takes longer, and the controller
    logs a WARNING with a traceback ("Failed to send resource request ... safe to ignore"). A
    one-node Ray has no autoscaler to ask, so that logger keeps to errors here (a filter: Ray Train's
    logging.config.dictConfig resets the levels of the loggers under ray.train, not their filters)."""
    import logging

    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    logging.getLogger("ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client").addFilter(
        lambda record: record.levelno >= logging.ERROR)


def _check_listening(address: str, where: str) -> None:
    """ray.init retries a host:port where nothing listens for minutes; a TCP connect fails at once."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():  # "auto", ray://...: left to Ray
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise UserError(f"{where}: no Ray cluster answers there ({exc.strerror or exc}); start one "
                        "with `ray start --head`, fix the address, or unset it to start a local Ray") from None


@contextmanager
def ray_session() -> Iterator[None]:
    """Shut Ray down on the way out if it was started inside this block."""
    import ray

    connected_before = ray.is_initialized()
    try:
        yield
    finally:
        if not connected_before and ray.is_initialized():
            ray.shutdown()


def require(what: str, cpus: float, gpus: float = 0.0, resources: dict[str, float] | None = None) -> None:
    """Refuse, with the key to change, a request no alive node can ever satisfy (Ray would
    otherwise wait for it forever). Resources other work holds for a while are not counted."""
    import ray

    wanted = {"CPU": cpus, "GPU": gpus, **(resources or {})}
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(all(n.get(k, 0) >= v for k, v in wanted.items()) for n in nodes):
        return
    custom = {k: v for k, v in wanted.items() if k not in ("CPU", "GPU") and v > 0}
    if custom and not any(all(n.get(k, 0) >= v for k, v in custom.items()) for n in nodes):
        have = sorted({k for n in nodes for k in n if k not in ("CPU", "GPU", "memory", "object_store_memory")
                       and not k.startswith("node:")})
        raise UserError(f"{what}: asks for resources {custom}, but no Ray node has them (custom resources of this "
                        f"cluster: {', '.join(have) or 'none'}); fix it or start a node with `ray start --resources`")
    biggest: dict[str, Any] = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
    raise UserError(f"{what}: asks for {cpus:g} CPU and {gpus:g} GPU per process, but the largest Ray node has "
                    f"{biggest.get('CPU', 0):g} CPU and {biggest.get('GPU', 0):g} GPU; lower it or add such a node")


def unwrap(fn, *args, **kwargs):
    """Call fn (ray.get, ...); a UserError raised inside a Ray task or actor comes back as itself."""
    import ray

    try:
        return fn(*args, **kwargs)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, UserError):
            raise UserError(str(cause)) from None
        raise


class StepCounter:
    """An actor holding a worker's step count, for a progress bar the driver draws (driver_progress)."""

    def __init__(self):
        self.step = 0

    def set(self, step: int) -> None:
        self.step = step

    def get(self) -> int:
        return self.step


@contextmanager
def driver_progress(desc: str, total: int, enabled: bool = True) -> Iterator[Any]:
    """A tqdm bar drawn by the driver, like every other stage's bar, from a StepCounter actor that a
    worker updates (`counter.set.remote(step)`); yields the counter (None when not enabled) and
    kills it on the way out. A bar drawn in a worker reaches the console prefixed "(pid=N)", and
    once per worker."""
    import threading

    import ray
    from tqdm import tqdm

    if not enabled:
        yield None
        return
    counter: Any = ray.remote(num_cpus=0)(StepCounter).remote()  # an ActorHandle; Ray's stubs do not type its methods
    stop = threading.Event()
    bar = tqdm(total=total, desc=desc, unit="step")

    def poll() -> None:
        while True:
            last = stop.wait(0.5)
            try:
                step = ray.get(counter.get.remote(), timeout=10)
            except ray.exceptions.GetTimeoutError:  # a machine too busy to answer in time: ask again
                if last:
                    return
                continue
            except Exception:  # noqa: BLE001 - Ray going down under us: the run's own error says why
                return
            if step != bar.n:  # lower after a restarted worker group resumes from its last checkpoint
                bar.update(step - bar.n)
            if last:
                return

    poller = threading.Thread(target=poll, name=f"{desc}-progress", daemon=True)
    poller.start()
    try:
        yield counter
    finally:
        stop.set()
        poller.join(timeout=15)
        bar.close()
        try:
            ray.kill(counter)
        except Exception:  # noqa: BLE001 - Ray already down
            pass
