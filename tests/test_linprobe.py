"""Linear probe: LARS maths, the official head, bitwise-frozen encoder, CLI end to end, --eval."""

from __future__ import annotations

import json

import pytest
import torch
from test_evaluate import save_tiny, write_colour_set

from mimkit.cli import main
from mimkit.engine.lars import LARS


def test_lars_step_matches_the_reference_maths() -> None:
    torch.manual_seed(0)
    w, b = torch.randn(4, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    gw, gb = torch.randn(4, 3), torch.randn(4)
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt = LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    for step in range(2):
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
    # by hand: matrices get wd and the trust ratio, vectors neither; momentum buffer mu = 0.9 mu + update
    def upd(p):
        d = gw + 0.1 * p
        return d * (0.001 * p.norm() / d.norm())
    mu = upd(w0)
    w1 = w0 - 0.5 * mu
    mu = 0.9 * mu + upd(w1)
    assert torch.allclose(w.detach(), w1 - 0.5 * mu, atol=1e-7)
    assert torch.allclose(b.detach(), b0 - 0.5 * gb - 0.5 * (0.9 * gb + gb), atol=1e-7)


def test_probe_head_is_official() -> None:
    from mimkit.models import create_model
    from mimkit.models.heads import LinearProbe, pooled_features

    enc = create_model("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
    probe = LinearProbe(enc, 5, global_pool=True).train()
    bn = probe.head[0]
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert not enc.training and all(not p.requires_grad for p in enc.parameters())
    x = torch.randn(3, 3, 32, 32)
    (raw,) = enc.forward_features(x, layers=(1,))
    want = torch.nn.functional.layer_norm(raw[:, 1:].mean(1), (32,), eps=1e-6)  # fc_norm at its init
    assert torch.allclose(pooled_features(enc, x, True), want, atol=1e-6)
    assert torch.equal(pooled_features(enc, x, False), enc.forward_features(x)[:, 0])


@pytest.mark.slow
@pytest.mark.parametrize("cached", [True, False])
def test_linprobe_cli_encoder_bitwise_unchanged(cached, tmp_path) -> None:
    ckpt = save_tiny(tmp_path / "tiny.pt")
    data = write_colour_set(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["linprobe", "--finetune", str(ckpt), "--data_path", str(data), "--epochs", "2", "--warmup_epochs", "1",
            "--batch_size", "8", "--output_dir", str(out), "--device", "cpu", "--num_workers", "0",
            "--opt", "sgd", "--blr", "8", "--input_size", "32"] + (["--no_aug"] if cached else [])
    assert main(argv) == 0
    r = json.loads((out / "results.json").read_text())
    m = r["metrics"]
    assert {"acc1", "acc5", "loss", "best_acc1", "best_epoch"} <= set(m)
    assert len(r["history"]) == 2 and m["acc1"] == r["history"][-1]["acc1"]
    assert r["config"]["optimization"]["lr"] == pytest.approx(8 * 8 / 256)  # blr * batch / 256 written back
    before = torch.load(ckpt, weights_only=True)["model"]
    after = torch.load(out / "checkpoints" / "final.pt", weights_only=True)["model"]
    enc_keys = [k for k in after if k.startswith("encoder.")]
    from mimkit.models.mae import ENCODER_PREFIXES

    assert len(enc_keys) == len([k for k in before if k.startswith(ENCODER_PREFIXES)])  # the decoder is left out
    for k in enc_keys:
        assert torch.equal(after[k], before[k[len("encoder."):]]), k
    head_before = torch.load(out / "checkpoints" / "best.pt", weights_only=True)["model"]["head.1.weight"]
    assert head_before.abs().sum() > 0
    if cached:
        # --eval of the best checkpoint reproduces the best epoch's accuracy
        ev = tmp_path / "eval"
        assert main(["linprobe", "--finetune", str(ckpt), "--data_path", str(data), "--eval", "--resume",
                     str(out / "checkpoints" / "best.pt"), "--output_dir", str(ev), "--device", "cpu",
                     "--no_aug", "--input_size", "32"]) == 0
        assert json.loads((ev / "results.json").read_text())["metrics"]["acc1"] == pytest.approx(m["best_acc1"])
