"""Test-only teachers that misbehave (imported by Ray actors through PYTHONPATH)."""

from torch import nn

from ensemblekd.testing import mlp


class _NaNOut(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x).clone()
        out[0] = float("nan")  # one bad row per batch is enough to poison a shard
        return out


def nan_mlp(**kwargs):
    return _NaNOut(mlp(**kwargs))


def slow_mlp(delay: float = 0.2, **kwargs):
    """An mlp that sleeps before every forward, so a test can kill its process mid-labelling.

    A pre-hook keeps the state-dict keys those of a plain mlp: its checkpoint loads as is."""
    import time

    model = mlp(**kwargs)
    model.register_forward_pre_hook(lambda module, args: time.sleep(delay))
    return model
