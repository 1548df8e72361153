"""Teachers: build a model from its spec, load its weights, fingerprint it, fit it.

A teacher is `model: "module:callable"` + `kwargs` and a state-dict checkpoint on any fsspec URI.
With a `fit` block the checkpoint is trained first (all such teachers in parallel Ray tasks) and
written where the config points; it is refitted only when the checkpoint is missing or the
model/fit spec changed (recorded beside it as `<checkpoint>.fit.json`).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from ensemblekd import storage
from ensemblekd.config import Config, TeacherConfig, import_callable
from ensemblekd.errors import UserError


def build_model(model: str, kwargs: dict[str, Any], key: str = "model") -> nn.Module:
    try:
        module = import_callable(model, key)(**kwargs)
    except TypeError as exc:
        raise UserError(f"{key}: {model}(**kwargs) failed ({exc}); fix the kwargs") from None
    if not isinstance(module, nn.Module):
        raise UserError(f"{key}: {model} returned {type(module).__name__}, not a torch.nn.Module")
    return module


def load_state(module: nn.Module, uri: str, who: str) -> nn.Module:
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{who}: checkpoint '{uri}' does not exist") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise UserError(f"{who}: '{uri}' is not a torch state dict ({type(exc).__name__})") from None
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise UserError(f"{who}: checkpoint '{uri}' does not match the model ({first})") from None
    return module.eval()


def save_state(module: nn.Module, uri: str) -> None:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, buf)
    storage.write_bytes_atomic(uri, buf.getvalue())


def spec_of(t: TeacherConfig) -> dict[str, Any]:
    return {"pretrained": t.pretrained} if t.pretrained else {"model": t.model, "kwargs": t.kwargs}


def teacher_fingerprint(cfg: Config, t: TeacherConfig) -> str:
    """fingerprint of the checkpoint, or of a pretrained directory's files (config and weights)."""
    if not t.pretrained:
        return fingerprint(cfg.teacher_checkpoint(t), spec_of(t))
    import os

    h = hashlib.sha256(json.dumps(spec_of(t), sort_keys=True).encode())
    for name in sorted(os.listdir(t.pretrained)):  # a local directory: from_pretrained downloads nothing
        if name.endswith((".json", ".safetensors", ".bin", ".model")):
            h.update(name.encode())
            h.update(storage.read_bytes(os.path.join(t.pretrained, name)))
    return h.hexdigest()[:16]


def fingerprint(checkpoint_uri: str, spec: dict[str, Any]) -> str:
    """sha256 over the checkpoint bytes and the model spec: changes when either does."""
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    h.update(storage.read_bytes(checkpoint_uri))
    return h.hexdigest()[:16]


def load_teacher(cfg: Config, t: TeacherConfig) -> nn.Module:
    if t.pretrained:
        from ensemblekd.lm import from_pretrained

        return from_pretrained(t.pretrained).eval()
    i = cfg.teachers.index(t)
    return load_state(build_model(t.model, t.kwargs, f"teachers.{i}.model"), cfg.teacher_checkpoint(t), f"teachers.{i}")


@torch.no_grad()
def predict(module: nn.Module, x: np.ndarray, batch_size: int = 1024, device: str = "cpu") -> np.ndarray:
    out = [module(torch.from_numpy(x[i:i + batch_size]).to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


# -- fit ------------------------------------------------------------------------------------
def _fit_key(t: TeacherConfig, data_cfg) -> dict[str, Any]:
    return {**spec_of(t), "fit": t.fit.model_dump(), "train": data_cfg.train}


def needs_fit(cfg: Config, t: TeacherConfig) -> bool:
    ckpt = cfg.teacher_checkpoint(t)
    if t.fit is None:
        return False
    sidecar = ckpt + ".fit.json"
    if not (storage.exists(ckpt) and storage.exists(sidecar)):
        return True
    return json.loads(storage.read_bytes(sidecar)).get("key") != _fit_key(t, cfg.data)


def fit_one(cfg: Config, t: TeacherConfig, num_threads: int = 1) -> dict[str, Any]:
    """Train one teacher on the labelled train rows (Adam, cross-entropy); save its checkpoint."""
    from ensemblekd.data import read_split

    storage.configure_for(cfg)
    torch.set_num_threads(num_threads)
    torch.manual_seed(t.fit.seed)
    start = time.perf_counter()
    d = cfg.data
    if cfg.task == "token":
        from ensemblekd.token_pipeline import fit_token_teacher

        model, val_acc = fit_token_teacher(cfg, t)
        return _save_fitted(cfg, t, model, val_acc, start)
    _, x, y = read_split(d.train, d.features, d.label, d.id)
    keep = y >= 0
    if not keep.any():
        raise UserError(f"teacher '{t.name}': fit needs labels, but the train split has none in column '{d.label}'")
    x, y = torch.from_numpy(x[keep]), torch.from_numpy(y[keep])
    model = build_model(t.model, t.kwargs, f"teacher '{t.name}'.model")
    opt = torch.optim.AdamW(model.parameters(), lr=t.fit.lr, weight_decay=t.fit.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.fit.epochs)
    g = torch.Generator().manual_seed(t.fit.seed)
    model.train()
    for _ in range(t.fit.epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), t.fit.batch_size):
            idx = perm[i:i + t.fit.batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    _, xv, yv = read_split(d.val, d.features, d.label, d.id)
    val_acc = float((predict(model, xv).argmax(1) == yv).mean()) if (yv >= 0).any() else None
    return _save_fitted(cfg, t, model, val_acc, start)


def _save_fitted(cfg: Config, t: TeacherConfig, model: nn.Module, val_acc: float | None, start: float) -> dict[str, Any]:
    ckpt = cfg.teacher_checkpoint(t)
    save_state(model, ckpt)
    storage.write_bytes_atomic(ckpt + ".fit.json", json.dumps({"key": _fit_key(t, cfg.data), "val_accuracy": val_acc}).encode())
    return {"name": t.name, "val_accuracy": val_acc, "seconds": time.perf_counter() - start}


def fit_teachers(cfg: Config, progress: bool = True) -> list[dict[str, Any]]:
    """Fit every teacher that needs it, in parallel Ray tasks (one per teacher)."""
    import ray
    from tqdm import tqdm

    from ensemblekd.ray_session import ensure_ray, require

    todo = [t for t in cfg.teachers if needs_fit(cfg, t)]
    if not todo:
        return []
    ensure_ray(cfg.ray)
    for t in todo:
        require(f"teacher '{t.name}' (num_cpus)", t.num_cpus)
    remote = ray.remote(fit_one)
    refs = {remote.options(num_cpus=t.num_cpus, num_gpus=0, max_retries=1).remote(cfg, t): t for t in todo}
    results = []
    with tqdm(total=len(refs), desc="fit teachers", unit="teacher", disable=not progress) as bar:
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            results.append(unwrap(ray.get, done[0]))
            acc = results[-1]["val_accuracy"]
            bar.set_postfix_str(f"{results[-1]['name']}: val acc " + ("n/a" if acc is None else f"{acc:.3f}"))
            bar.update()
    return results


def unwrap(fn, *args, **kwargs):
    """Call fn; a UserError raised inside a Ray task or actor comes back as itself."""
    import ray

    try:
        return fn(*args, **kwargs)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if hasattr(exc, "cause") else None
        if isinstance(cause, UserError):
            raise UserError(str(cause)) from None
        raise
