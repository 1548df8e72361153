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


def ensure_ray(ray_cfg) -> None:
    """Join ray.address (or RAY_ADDRESS), or start a local Ray with ray.num_cpus, unless connected.

    With neither set, address "local" forces a fresh local Ray: a bare ray.init() would join
    whatever cluster `ray start` last started on this machine. An address where no Ray listens,
    or whose cluster refuses us (token authentication), is a one-line UserError.
    """
    import ray

    if ray.is_initialized():
        return
    env = os.environ.get("RAY_ADDRESS") or None
    address = ray_cfg.address or env
    kwargs: dict[str, Any] = {"address": address, "logging_level": logging.WARNING,
                              "logging_config": ray.LoggingConfig(log_level="WARNING")}
    if address is None:
        kwargs.update(address="local", num_cpus=ray_cfg.num_cpus)
        ray.init(**kwargs)
        return
    # As in Ray, "auto" means RAY_ADDRESS when that is set (it is, inside `ray job submit`).
    key, target = ("ray.address", address) if ray_cfg.address and not (address == "auto" and env) else ("RAY_ADDRESS", env)
    where = f"{key}={target}"
    _check_listening(target, where)
    try:
        ray.init(**kwargs)
    except (ConnectionError, ray.exceptions.AuthenticationError) as exc:
        hint = "" if os.environ.get("RAY_AUTH_MODE") == "token" else (
            "; if the cluster has token authentication on, set RAY_AUTH_MODE=token and its token "
            "(RAY_AUTH_TOKEN, or the file ~/.ray/auth_token)")
        raise UserError(f"{where}: cannot join the Ray cluster ({' '.join(str(exc).split())}){hint}") from None


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


def require(what: str, cpus: float, gpus: float = 0.0) -> None:
    """Refuse, with the key to change, a request no alive node can ever satisfy (Ray would
    otherwise wait for it forever). Resources other work holds for a while are not counted."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
        return
    biggest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
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
