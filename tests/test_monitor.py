"""Pretraining monitor: k-NN / RankMe every N epochs, logged as 'eval' records, no RNG consumed."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_MODEL, write_images
from test_evaluate import TINY_KW, write_colour_set

from mimkit.cli import main
from mimkit.models import create_model
from mimkit.tasks.monitor import MonitorHook


class _Log:
    def __init__(self) -> None:
        self.lines, self.records = [], []

    def info(self, msg: str) -> None:
        self.lines.append(msg)

    def metrics(self, record: dict, step: int, tb_prefix: str = "train") -> None:
        self.records.append((record, step, tb_prefix))


def test_hook_schedule_values_and_rng(tmp_path) -> None:
    from mimkit.data.sources import open_dataset
    from mimkit.data.transforms import eval_transform

    data = write_colour_set(tmp_path / "data")
    tf = eval_transform(32)
    train, val = open_dataset(str(data), "train", tf), open_dataset(str(data), "val", tf)
    log = _Log()
    hook = MonitorHook(train, val, every=2, ks=[1, 3], run_log=log, epochs=5, batch_size=8)
    model = create_model("mae_vit_tiny_patch16", img_size=32, **TINY_KW).train()
    trainer = SimpleNamespace(model=model, device=torch.device("cpu"), state=SimpleNamespace(step=7),
                              dist=SimpleNamespace(is_main=True))
    torch.manual_seed(0)
    state = torch.get_rng_state()
    for epoch in range(5):
        hook.on_epoch_end(trainer, epoch)
    assert torch.equal(torch.get_rng_state(), state)  # bitwise resume depends on this
    assert [r["epoch"] for r, _, _ in log.records] == [1, 3, 4]  # every 2 epochs, and the last
    rec, step, prefix = log.records[0]
    assert rec["kind"] == "eval" and step == 7 and prefix == "eval"
    assert rec["knn_top1_k1"] == 100.0 and 1.0 <= rec["rankme_val"] <= 12
    assert model.training  # the model goes back to training mode


@pytest.mark.slow
def test_pretrain_logs_monitoring(tmp_path) -> None:
    imgs = tmp_path / "imgs"
    write_images(imgs, 16)
    data = write_colour_set(tmp_path / "labelled")
    out = tmp_path / "run"
    assert main(["pretrain", *TINY_MODEL, "--data_path", str(imgs), "--output_dir", str(out), "--epochs", "2",
                 "--batch_size", "8", "--num_workers", "0", "--device", "cpu", "--eval_data_path", str(data),
                 "--eval_every", "1", "eval.knn_k=[1,5]", "logging.tensorboard=false"]) == 0
    evals = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r.get("kind") == "eval"]
    assert [r["epoch"] for r in evals] == [0, 1]
    assert {"knn_top1_k1", "knn_top1_k5", "rankme_train", "rankme_val"} <= set(evals[0])
    assert "eval epoch 1: knn_top1_k1" in (out / "log.txt").read_text()
