"""Tiny OpenMMLab models built by their own libraries (mmpretrain, MMSegmentation) and saved by mmengine's
checkpoint saver, as an OpenMMLab Runner saves them: {meta (cfg text, dataset_meta), state_dict, message_hub,
optimizer}. Imported by tests that skip when the `openmmlab` extra is absent.

MMSegmentation's package import needs mmcv's compiled ops (`mmcv._ext`), which mmcv-lite lacks: `import_mmseg`
registers a stand-in `mmcv._ext` whose every op raises when called. The modules used here (MAE backbone,
Feature2Pyramid, UPerHead, FCNHead, EncoderDecoder, init_model) never call one; only the import of other modules
(deformable attention, ...) looks them up.
"""

from __future__ import annotations

import logging
import sys
import types
import warnings
from pathlib import Path

import torch

TINY_SEG = dict(img=32, patch=8, dim=64, depth=4, heads=2, taps=[0, 1, 2, 3], classes=8, channels=32, aux=16)
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def _quiet() -> None:
    warnings.filterwarnings("ignore", module="mmcv|mmengine|mmseg|mmpretrain")
    logging.getLogger("mmengine").setLevel(logging.ERROR)


def import_mmseg():
    """Import mmseg.models (with the compiled-op stand-in) and register its modules; returns mmseg's MODELS."""
    if "mmcv._ext" not in sys.modules:
        try:
            import mmcv._ext  # noqa: F401  (a full mmcv build)
        except ImportError:
            ext = types.ModuleType("mmcv._ext")

            def _op(name: str):
                def missing(*a, **k):
                    raise RuntimeError(f"mmcv compiled op {name} is not available (mmcv-lite)")
                return missing

            def _getattr(name: str):
                if name.startswith("__"):
                    raise AttributeError(name)
                return _op(name)

            ext.__getattr__ = _getattr  # type: ignore[attr-defined]
            sys.modules["mmcv._ext"] = ext
    _quiet()
    import mmseg.models  # noqa: F401
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    return _Scoped(MODELS, "mmseg")


class _Scoped:
    """A registry whose build runs in its library's default scope (mmpretrain and mmseg share one process)."""

    def __init__(self, registry, scope: str) -> None:
        self.registry, self.scope = registry, scope

    def build(self, cfg: dict):
        from mmengine.registry import DefaultScope

        with DefaultScope.overwrite_default_scope(self.scope):
            return self.registry.build(cfg)


def mmpretrain_models():
    _quiet()
    from mmpretrain.registry import MODELS
    from mmpretrain.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    return _Scoped(MODELS, "mmpretrain")


def mae_cfg(dim: int = 64, depth: int = 2, heads: int = 2, dec: int = 32, dec_heads: int = 2) -> dict:
    """mmpretrain's MAE (MAEViT + MAEPretrainDecoder + MAEPretrainHead, norm_pix) at 32 px, patch 8."""
    arch = dict(embed_dims=dim, num_layers=depth, num_heads=heads, feedforward_channels=4 * dim)
    return dict(type="MAE",
                backbone=dict(type="MAEViT", arch=arch, img_size=32, patch_size=8, mask_ratio=0.75),
                neck=dict(type="MAEPretrainDecoder", num_patches=16, patch_size=8, in_chans=3, embed_dim=dim,
                          decoder_embed_dim=dec, decoder_depth=1, decoder_num_heads=dec_heads, mlp_ratio=4.0),
                head=dict(type="MAEPretrainHead", norm_pix=True, patch_size=8,
                          loss=dict(type="PixelReconstructionLoss", criterion="L2")))


def vit_classifier_cfg(dim: int = 64, depth: int = 2, heads: int = 2, classes: int = 5) -> dict:
    """mmpretrain's ViT classifier as its MAE fine-tuning configs build it: average pooling + ln2, no final ln1."""
    arch = dict(embed_dims=dim, num_layers=depth, num_heads=heads, feedforward_channels=4 * dim)
    return dict(type="ImageClassifier",
                backbone=dict(type="VisionTransformer", arch=arch, img_size=32, patch_size=8, final_norm=False,
                              out_type="avg_featmap"),
                neck=None, head=dict(type="VisionTransformerClsHead", num_classes=classes, in_channels=dim))


def upernet_cfg(s: dict = TINY_SEG) -> dict:
    """MMSeg's mae-base_upernet ADE20K model (MAE backbone with layer scale, Feature2Pyramid, UPerHead, FCNHead)
    at tiny sizes; BN for SyncBN (one process)."""
    norm = dict(type="BN", requires_grad=True)
    dim = s["dim"]
    return dict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=MEAN, std=STD, bgr_to_rgb=True, pad_val=0,
                               seg_pad_val=255, size=(s["img"], s["img"])),
        backbone=dict(type="MAE", img_size=(s["img"], s["img"]), patch_size=s["patch"], embed_dims=dim,
                      num_layers=s["depth"], num_heads=s["heads"], mlp_ratio=4, init_values=0.1,
                      drop_path_rate=0.1, out_indices=s["taps"]),
        neck=dict(type="Feature2Pyramid", embed_dim=dim, rescales=[4, 2, 1, 0.5], norm_cfg=norm),
        decode_head=dict(type="UPerHead", in_channels=[dim] * 4, in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6),
                         channels=s["channels"], dropout_ratio=0.1, num_classes=s["classes"], norm_cfg=norm,
                         align_corners=False,
                         loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)),
        auxiliary_head=dict(type="FCNHead", in_channels=dim, in_index=2, channels=s["aux"], num_convs=1,
                            concat_input=False, dropout_ratio=0.1, num_classes=s["classes"], norm_cfg=norm,
                            align_corners=False,
                            loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4)),
        train_cfg=dict(), test_cfg=dict(mode="whole"))


def randomise_(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter and BN statistic away from its init (layer scale, BN, zero-initialised biases), so a
    mapping that drops or swaps one shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                continue  # stays zero: mimkit supports MMSeg's MAE only with its (zero-initialised) table unused
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
            elif name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def save_like_runner(model: torch.nn.Module, cfg: dict, path: Path, classes=None) -> Path:
    """mmengine's save_checkpoint of what Runner.save_checkpoint writes: meta (cfg pretty text, dataset_meta),
    state_dict, a real optimizer state and the MessageHub state (HistoryBuffer objects: not weights_only-loadable)."""
    from mmengine.config import Config
    from mmengine.logging import MessageHub
    from mmengine.runner.checkpoint import save_checkpoint

    hub = MessageHub.get_instance(f"mimkit-test-{path.stem}")
    hub.update_scalar("train/loss", 1.25)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    meta = {"epoch": 3, "iter": 120, "cfg": Config(dict(model=cfg)).pretty_text, "seed": 0,
            "experiment_name": "tiny", "mmengine_version": "0.10.7"}
    if classes:
        meta["dataset_meta"] = {"classes": tuple(classes), "palette": [[0, 0, 0]] * len(classes)}
    save_checkpoint({"meta": meta, "state_dict": model.state_dict(), "optimizer": opt.state_dict(),
                     "message_hub": hub.state_dict()}, str(path))
    return path
