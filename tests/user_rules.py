"""A user's own weighting rule and strategy, given to configs as 'user_rules:NAME' (imported by the
Ray Train workers through PYTHONPATH, as tests/faulty_models.py is)."""

import torch

import ensemblekd as ekd


class Favourite:
    """All the weight on one named teacher (`distill.favourite`, its own key)."""

    class Options(ekd.Options):
        favourite: str

    def __init__(self, teacher_names, favourite, val_accuracy=None):
        self.index = list(teacher_names).index(favourite)
        self.k = len(teacher_names)

    def __call__(self, teacher_logits, labels, temperature):
        w = teacher_logits.new_zeros((teacher_logits.shape[0], self.k), dtype=torch.float32)
        w[:, self.index] = 1.0
        return w


class Alternating(ekd.Strategy):
    """Teacher epoch % K alone, switching every `distill.period` epochs: a staged strategy of the user's."""

    class Options(ekd.Options):
        period: int = 1

    def __init__(self, teacher_names, rule, mix_space="prob", period=1, **_):
        self.k, self.period, self.mix_space = len(teacher_names), period, mix_space

    def stage(self, epoch):
        return (epoch // self.period) % self.k

    def weights(self, teacher_logits, labels, temperature, epoch=0):
        w = teacher_logits.new_zeros((teacher_logits.shape[0], self.k), dtype=torch.float32)
        w[:, self.stage(epoch)] = 1.0
        return w
