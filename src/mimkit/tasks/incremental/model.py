"""The class-incremental classifier: a backbone (CIFAR ResNet-18 or an MAE ViT encoder), a linear head over the
classes seen so far that grows at every task, and (for masked-feature distillation) the channel masker."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from mimkit.models.resnet import BACKBONES, resnet18_cifar


class FeatureMasker(nn.Module):
    """Masks `mask_ratio` of a feature's channels, MAE-style (argsort of uniform noise), and fills them.

    mask_mode: s = one learnable scalar token; a = a learnable vector, one value per masked slot (in the
    shuffled order, as MAE's mask tokens); sgf / agf = the same shapes held at zero, without gradient.
    """

    def __init__(self, dim: int, mask_ratio: float, mask_mode: str) -> None:
        super().__init__()
        self.dim, self.mask_ratio, self.mask_mode = dim, mask_ratio, mask_mode
        self.len_keep = int(dim * (1 - mask_ratio))  # MAE's rounding
        size = 1 if mask_mode in ("s", "sgf") else dim - self.len_keep
        token = torch.zeros(1, size)
        if mask_mode in ("s", "a"):
            self.token = nn.Parameter(token)
        else:  # a buffer: saved with the model, never trained
            self.register_buffer("token", token)

    def forward(self, feats: torch.Tensor, noise: Optional[torch.Tensor] = None):
        """feats (N, D) -> (masked (N, D), inverse (N, D), mask (N, D) with 1 = masked).

        masked: the kept channels of feats, the others the token; inverse: the masked channels of feats, the
        kept ones zero (its forward is used detached).
        """
        n, d = feats.shape
        if noise is None:
            noise = torch.rand(n, d, device=feats.device)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        kept = torch.gather(feats, 1, ids_shuffle[:, :self.len_keep])
        tokens = self.token.to(feats.dtype).expand(n, d - self.len_keep)
        masked = torch.gather(torch.cat([kept, tokens], dim=1), 1, ids_restore)
        mask = torch.ones(n, d, device=feats.device, dtype=feats.dtype)
        mask[:, :self.len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return masked, feats * mask, mask


class ViTBackbone(nn.Module):
    """An MAE encoder as a backbone: the mean of its normed patch tokens, (N, C, H, W) -> (N, D)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        # the pixel decoder (and its mask token) plays no part in classification
        names = [n for n, _ in encoder.named_children()] + [n for n, _ in encoder.named_parameters(recurse=False)]
        for name in names:
            if name.startswith("decoder") or name == "mask_token":
                delattr(encoder, name)
        self.encoder = encoder
        self.feat_dim = encoder.embed_dim

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs (N, C, H, W) -> (N, D)."""
        from mimkit.tasks.evaluation.features import pool_tokens

        return pool_tokens(self.encoder.forward_features(imgs), "avg")


class IncrementalClassifier(nn.Module):
    """backbone -> features (N, D) -> head (N, classes seen so far); `expand` grows the head for a new task."""

    def __init__(self, backbone: nn.Module, feat_dim: int, num_classes: int,
                 masker: Optional[FeatureMasker] = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.feat_dim = feat_dim
        self.head = nn.Linear(feat_dim, num_classes)
        self.masker = masker

    @property
    def num_classes(self) -> int:
        """Classes the head scores now."""
        return self.head.out_features

    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs (N, C, H, W) -> backbone features (N, D)."""
        return self.backbone(imgs)

    def forward(self, imgs: torch.Tensor, return_features: bool = False):
        """imgs (N, C, H, W) -> logits (N, classes) (and the features (N, D) with return_features)."""
        feats = self.backbone(imgs)
        logits = self.head(feats)
        return (logits, feats) if return_features else logits

    @torch.no_grad()
    def expand(self, num_classes: int) -> None:
        """Grow the head to num_classes outputs: old rows kept, new rows freshly initialised (global RNG)."""
        old = self.head
        if num_classes == old.out_features:
            return
        new = nn.Linear(self.feat_dim, num_classes).to(old.weight.device, old.weight.dtype)
        new.weight[:old.out_features] = old.weight
        new.bias[:old.out_features] = old.bias
        self.head = new


def build_classifier(model_type: str, nf: Optional[int], finetune: Optional[str], input_size: int,
                     num_classes: int, masker_args: Optional[tuple[float, str]] = None):
    """(IncrementalClassifier, description): a CIFAR ResNet-18, or the ViT encoder of an MAE checkpoint."""
    if finetune:
        from mimkit.models.loading import model_from_checkpoint

        # --model naming an MAE model (not a ResNet) states the heads of a file that does not (an OpenMMLab file)
        named = None if model_type in BACKBONES else model_type
        encoder, desc = model_from_checkpoint(finetune, model_name=named, input_size=input_size, decoder="unused")
        backbone = ViTBackbone(encoder.train())
    else:
        width = nf or BACKBONES[model_type]
        backbone = resnet18_cifar(width)
        desc = f"{model_type} (CIFAR ResNet-18, nf={width})"
    masker = FeatureMasker(backbone.feat_dim, *masker_args) if masker_args else None
    model = IncrementalClassifier(backbone, backbone.feat_dim, num_classes, masker)
    params = sum(p.numel() for p in model.parameters())
    return model, f"{desc}, {backbone.feat_dim}-d features, {params:,} parameters"
