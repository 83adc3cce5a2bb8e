"""engine/meta_init.py: a build recorded on the meta device and replayed tensor by tensor gives the weights of a
normal build with the same seed, bitwise, without ever holding the model (one process; the 2-rank sharded build
is in test_fsdp.py)."""

from __future__ import annotations

import torch
import torch.nn as nn

from mimkit.engine.meta_init import InitRecorder, meta_tensors
from mimkit.models import create_model

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
            decoder_num_heads=2)


def replayed(build, seed: int = 0) -> tuple[dict, int, int]:
    """(tensors a recorded build replays to, the replay's peak bytes, ops recorded); a normal build is `build()`."""
    torch.manual_seed(seed)
    rec = InitRecorder()
    with rec, torch.device("meta"):
        model = build()
    metas = meta_tensors(model)
    live = {k: torch.full(v.shape, float("nan"), dtype=v.dtype) for k, v in metas.items()}
    torch.manual_seed(seed + 123)  # whatever the generator is at now: the replay draws from the build's state
    before = torch.get_rng_state()
    peak = rec.materialise([(metas[k], live[k]) for k in metas])
    assert torch.equal(torch.get_rng_state(), before)  # and hands the generator back as it found it
    return live, peak, len(rec.ops)


def normal(build, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = build()
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def assert_same(live: dict, ref: dict) -> None:
    assert live.keys() == ref.keys()
    for k, v in ref.items():
        assert torch.equal(live[k], v.detach()), k


def test_mae_and_localmim_replay_bitwise_one_tensor_at_a_time():
    for name, kw in (("mae_vit_tiny_patch16", TINY),
                     ("localmim_vit_tiny_patch16", dict(img_size=32, patch_size=8, embed_dim=32, depth=4,
                                                        num_heads=2, hog_nbins=4, hog_bias=True))):
        build = lambda: create_model(name, **kw)  # noqa: E731
        live, peak, n_ops = replayed(build)
        ref = normal(build)
        assert_same(live, ref)  # LocalMIM's HOG kernels (torch.tensor constants) and its random HOG bias too
        largest = max(v.numel() * v.element_size() for v in ref.values())
        assert n_ops > len(ref) and peak <= largest  # never more than one tensor in full at once


def test_a_build_that_reseeds_and_loads_a_checkpoint():
    # fork_rng + manual_seed inside the build (load_encoder's --random_init) and load_state_dict of CPU weights
    torch.manual_seed(7)
    saved = nn.Linear(4, 3).state_dict()

    def build():
        a = nn.Linear(4, 3)
        a.load_state_dict(saved)  # recorded as copies of the CPU tensors: borrowed, not held again
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)
            b = nn.Linear(3, 3)
        c = nn.Linear(3, 2)
        from timm.layers import trunc_normal_

        trunc_normal_(c.weight, std=0.02)  # uniform_, erfinv_, mul_, add_, clamp_: a chain on one tensor
        return nn.Sequential(a, b, c)

    live, peak, _ = replayed(build, seed=1)
    ref = normal(build, seed=1)
    assert_same(live, ref)
    assert torch.equal(live["0.weight"], saved["weight"])


def test_finetune_classifier_from_a_checkpoint(tmp_path):
    from test_evaluate import save_tiny

    from mimkit.models.heads import vit_classifier
    from mimkit.tasks.evaluation import common as E

    ckpt = save_tiny(tmp_path / "enc.pt")

    def build():
        enc, _ = E.load_encoder(str(ckpt), None, (32, 32), False, 0)
        return vit_classifier(enc, 3, True, 0.1)

    live, peak, _ = replayed(build)
    ref = normal(build)
    assert_same(live, ref)
    # the encoder's weights come from the checkpoint's own tensors: only the fresh head and norms are made
    assert peak <= max(v.numel() * v.element_size() for v in ref.values())
