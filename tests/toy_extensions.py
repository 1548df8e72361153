"""One toy of each extension point, written from outside the package as docs/architecture.md's
recipe says (tests/integration/test_extensions.py runs them end to end). Configs name them as
'toy_extensions:NAME'; Ray's processes import this module through PYTHONPATH (the tests' folder).

- ToyTask: classification whose label stage records a marker in the store (Task.store_info) and
  whose report adds a column of its own, the test error rate (Task.columns, Task.quality);
- ToyKind: a torch teacher whose manifest spec carries a marker (TeacherKind.spec), for ToyTask;
- FirstTeacherOnly: a strategy that gives the first teacher all the weight;
- half_squared_distance: a divergence, 1/2 Σ (q - s)².

CALLS counts the calls made in this process: the distill stage runs in process in the test
(trainer.num_workers 0), so the strategy and the divergence count there.
"""

from collections import Counter

import torch

import ensemblekd as ekd
from ensemblekd.tasks import Column
from ensemblekd.tasks.classification import Classification
from ensemblekd.teachers.pytorch import TorchKind

TASK = "toy_extensions:ToyTask"
CALLS: Counter = Counter()


class ToyTask(Classification):
    name = TASK

    columns = (*Classification.columns, Column("error", "error", "%"))

    def store_info(self, cfg):
        return {**super().store_info(cfg), "toy_task": "made by ToyTask"}

    def quality(self, cfg, store, teachers, others, student, strategy):
        found, targets = super().quality(cfg, store, teachers, others, student, strategy)
        for row in found.values():
            row["error"] = 1 - row["accuracy"]
        return found, targets


class ToyKind(TorchKind):
    name = "toy"
    tasks = ("classification", TASK)

    def spec(self, t):
        return {**super().spec(t), "toy_kind": True}


class FirstTeacherOnly(ekd.Strategy):
    def __init__(self, teacher_names, rule, mix_space="prob", **_):
        self.k, self.mix_space = len(teacher_names), mix_space

    def weights(self, teacher_logits, labels, temperature, epoch=0):
        CALLS["strategy"] += 1
        w = teacher_logits.new_zeros((teacher_logits.shape[0], self.k), dtype=torch.float32)
        w[:, 0] = 1.0
        return w


def half_squared_distance(log_q, log_s):
    CALLS["loss"] += 1
    return 0.5 * (log_q.exp() - log_s.exp()).pow(2).sum(-1)
