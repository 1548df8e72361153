"""The distill stage: each worker's share of the data, the DeepSpeed config, and real training
on Ray Train workers under every ZeRO stage."""

import numpy as np
import pytest
import torch

import ensemblekd as ekd
from ensemblekd import UserError
from ensemblekd.stages.train import deepspeed_config
from ensemblekd.store import Store
from ensemblekd.tasks import classification, get_task, worker_segments
from ensemblekd.testing import build_module, load_state


def _rows(segments, offsets):
    return [offsets[s] + r for s, a, b in segments for r in range(a, b)]


@pytest.mark.parametrize("shard_rows,workers", [([10, 7, 3, 12], 2), ([5, 5, 5], 3), ([100], 4), ([3, 1, 9, 4, 4], 2)])
def test_workers_get_disjoint_equal_shares(shard_rows, workers):
    offsets = np.concatenate([[0], np.cumsum(shard_rows)[:-1]])
    for epoch in range(3):
        shares = [_rows(worker_segments(shard_rows, workers, r, 0, epoch), offsets) for r in range(workers)]
        flat = [row for share in shares for row in share]
        assert len(flat) == len(set(flat))                                 # no row seen twice
        assert {len(s) for s in shares} == {sum(shard_rows) // workers}    # equal steps on every worker
        every = [_rows(worker_segments(shard_rows, workers, r, 0, epoch, drop_remainder=False), offsets)
                 for r in range(workers)]
        assert sorted(row for s in every for row in s) == list(range(sum(shard_rows)))


def test_shard_order_is_seeded_and_changes_per_epoch():
    rows = [4] * 12
    a = worker_segments(rows, 2, 0, seed=1, epoch=0)
    assert a == worker_segments(rows, 2, 0, seed=1, epoch=0)
    assert a != worker_segments(rows, 2, 0, seed=1, epoch=1)


def test_deepspeed_config_is_generated_then_user_keys_win(labelled):
    cfg, _ = labelled
    tr = cfg.trainer.model_copy(update={"num_workers": 2, "zero_stage": 2, "deepspeed": {"zero_optimization": {"overlap_comm": True},
                                                                      "gradient_clipping": 1.0}})
    ds = deepspeed_config(tr)
    assert ds["train_batch_size"] == tr.batch_size
    assert ds["train_micro_batch_size_per_gpu"] * tr.num_workers == tr.batch_size
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["gradient_clipping"] == 1.0


def test_batches_zip_inputs_with_every_teacher(labelled):
    cfg, _ = labelled
    store = Store.open(cfg.store.uri)
    segments = [(0, 0, 50), (1, 10, 40)]
    batches = list(get_task(cfg.task).batches(cfg, store, "train", ["mlp_a", "mlp_b"], segments, 32, None))
    assert [len(b[1]) for b in batches] == [32, 32, 16]
    x, y, z, f = batches[0]
    assert x.shape == (32, 64) and z.shape == (32, 2, 10) and z.dtype == torch.float32
    assert f.shape == (32, 0)                                   # no feature terms: no features read
    _, logits_a, _ = classification.decode(store.read_table("train", "mlp_a", 0))
    assert torch.allclose(z[:, 0], torch.from_numpy(logits_a[:32].astype(np.float32)))


def test_misaligned_teacher_shard_is_refused(labelled, tmp_path):
    cfg, _ = labelled
    store = Store.open(cfg.store.uri)
    shifted = Store(store.uri, {**store.manifest, "inputs": {"train": list(reversed(store.inputs("train")))}})
    with pytest.raises(UserError, match="not aligned"):
        get_task("classification").read_rows(cfg, shifted, "train", 0, ["mlp_a"])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_distill_trains_under_every_zero_stage(labelled, tmp_path, stage):
    cfg, _ = labelled
    cfg = cfg.model_copy(deep=True)
    cfg.trainer.num_workers, cfg.trainer.zero_stage = 2, stage  # Ray Train workers: ZeRO shards over them
    cfg.trainer.epochs = 3
    cfg.trainer.output_dir = str(tmp_path / "out")
    result = ekd.distill(cfg)
    m = result.metrics
    assert m["epoch"] == 2 and m["val_accuracy"] > 0.5
    student = load_state(build_module(cfg.student.model, cfg.student.kwargs), result.student, "student")
    assert sum(p.numel() for p in student.parameters()) == 64 * 32 + 32 + 32 * 10 + 10


def test_student_with_the_wrong_class_count_fails_before_training(labelled, tmp_path):
    cfg, _ = labelled
    cfg = cfg.model_copy(deep=True)
    cfg.student.kwargs = {**cfg.student.kwargs, "num_classes": 7}
    with pytest.raises(UserError, match="outputs 7 classes but the teachers have 10"):
        ekd.distill(cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("deepspeed", [{}, {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}],
                         ids=["fp32", "bf16-autocast"])
def test_distill_on_gpu_with_nccl(labelled, tmp_path, deepspeed):
    """On the GPU, NCCL; bf16 autocast is DeepSpeed's own (trainer.deepspeed.torch_autocast), which
    wraps the engine's forward: on CPU it trains too (one run: the same accuracy as fp32 after 2
    epochs, a loss differing in the 4th decimal)."""
    cfg, _ = labelled
    cfg = cfg.model_copy(deep=True)
    cfg.trainer.use_gpu, cfg.trainer.num_workers, cfg.trainer.epochs = True, 1, 2
    cfg.trainer.output_dir = str(tmp_path / "out")
    cfg.trainer.deepspeed = deepspeed
    assert ekd.distill(cfg).metrics["val_accuracy"] > 0.5


def test_trainer_resources_no_node_has_are_refused(labelled, tmp_path):
    cfg, _ = labelled
    cfg = cfg.model_copy(deep=True)
    cfg.trainer.num_workers, cfg.trainer.cpus_per_worker = 2, 64
    with pytest.raises(UserError, match="trainer.cpus_per_worker/use_gpu: asks for 64 CPU"):
        ekd.distill(cfg)


@pytest.mark.parametrize("batch_size", [1, 3, 7, 64])
def test_batches_cover_every_row_once_across_uneven_shards(monkeypatch, batch_size):
    """Batches are full except the last, and concatenated they are the rows in segment order,
    also when a batch spans two (or more) shards."""
    task = get_task("classification")

    sizes = [5, 2, 9, 1, 13]
    offsets = np.cumsum([0, *sizes])

    def fake_rows(cfg, store, split, shard, teachers):
        rows = np.arange(offsets[shard], offsets[shard + 1])
        return classification.Rows(rows[:, None].astype(np.float32), rows,
                                   np.repeat(rows[:, None, None], 2, axis=1).astype(np.float16),
                                   np.zeros((len(rows), 0), np.float32))

    monkeypatch.setattr(task, "read_rows", fake_rows)
    segments = [(4, 3, 13), (0, 0, 5), (3, 0, 1), (1, 0, 2), (2, 1, 9)]
    batches = list(task.batches(None, None, "train", ["a", "b"], segments, batch_size, None))
    expected = np.concatenate([np.arange(offsets[s] + a, offsets[s] + b) for s, a, b in segments])
    assert all(len(y) == batch_size for _, y, _, _ in batches[:-1]) and 0 < len(batches[-1][1]) <= batch_size
    assert np.array_equal(torch.cat([y for _, y, _, _ in batches]).numpy(), expected)
    assert np.array_equal(torch.cat([x[:, 0] for x, _, _, _ in batches]).numpy(), expected)
    assert torch.equal(torch.cat([z[:, 1, 0] for _, _, z, _ in batches]), torch.from_numpy(expected).float())
