"""MaskedAutoencoderViT: the official MAE model (state-dict compatible) plus dense loss and freezing API."""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn as nn
from timm.layers import to_2tuple
from timm.models.vision_transformer import PatchEmbed

from mimkit.errors import UserError, suggest
from mimkit.models import vit
from mimkit.models.checkpointing import GradCheckpointing, checkpoint_blocks

LOSS_MODES = ("masked_only", "all_pixels")
FREEZE_MODES = ("none", "encoder_layernorms_only", "layernorm_only", "encoder_only")
# Parameters that hold the fixed sin-cos position embeddings: never trainable, never counted as such.
FIXED_PARAMS = ("pos_embed", "decoder_pos_embed")
ENCODER_PREFIXES = ("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.")


class MaskedAutoencoderViT(nn.Module):
    """Masked autoencoder with a ViT encoder and a light ViT decoder (He et al., 2021)."""

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_layer: Callable[..., nn.Module] | None = None,
        norm_pix_loss: bool = False,
        drop_path: float = 0.0,
        layer_norm_eps: float = 1e-6,
        decoder_mlp_ratio: float | None = None,
        init_values: float | None = None,
    ) -> None:
        super().__init__()
        # every LayerNorm's eps: the official 1e-6, or a checkpoint's own (Hugging Face configs often say 1e-12)
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=layer_norm_eps)
        self.img_size = to_2tuple(img_size)
        self.patch_size = int(patch_size)
        self.in_chans = int(in_chans)
        if self.img_size[0] % self.patch_size or self.img_size[1] % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        self.grid_size = (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.embed_dim = embed_dim
        self.depth = depth
        self.norm_pix_loss = norm_pix_loss
        # encoder layer scale (MMSegmentation's MAE backbone); None = the official block, no extra keys
        self.init_values = init_values
        # FreezeOut: blocks [0, frozen_prefix) (and the patch embedding) run without autograd.
        self.frozen_prefix = 0

        # encoder
        self.patch_embed = PatchEmbed(self.img_size, self.patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = vit.make_blocks(embed_dim, depth, num_heads, mlp_ratio, norm_layer, drop_path, init_values)
        self.norm = norm_layer(embed_dim)

        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, self.num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = vit.make_blocks(
            # the decoder's own ratio: ViT-g/G encoders (48/11, 64/13) keep the official decoder's 4
            decoder_embed_dim, decoder_depth, decoder_num_heads, decoder_mlp_ratio or mlp_ratio, norm_layer
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size**2 * in_chans, bias=True)

        self.initialize_weights()

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        """Official MAE initialisation: fixed sin-cos pos embeds, xavier patch embed, N(0, .02) tokens."""
        self.pos_embed.data.copy_(vit.sincos_pos_embed_2d(self.embed_dim, self.grid_size, cls_token=True)[None])
        self.decoder_pos_embed.data.copy_(
            vit.sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], self.grid_size, cls_token=True)[None]
        )
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(vit.init_vit_weights_)

    # ------------------------------------------------------------------ shapes
    def check_images(self, imgs: torch.Tensor) -> None:
        """Raise ValueError naming the problem when imgs is not (N, in_chans, *img_size)."""
        if imgs.ndim != 4:
            raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(imgs.shape)}")
        n, c, h, w = imgs.shape
        if c != self.in_chans:
            raise ValueError(f"model expects {self.in_chans} channels, images have {c}")
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        if (h, w) != self.img_size:
            raise ValueError(
                f"image size {h}x{w} does not match the model's img_size {self.img_size[0]}x{self.img_size[1]}"
            )

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: (N, C, H, W) -> x: (N, L, patch_size**2 * C)."""
        return vit.patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, L, patch_size**2 * C) -> imgs: (N, C, H, W)."""
        return vit.unpatchify(x, self.patch_size, self.grid_size, self.in_chans)

    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """x: (N, L, D) -> (x_kept (N, L*(1-r), D), mask (N, L) 0 keep 1 remove, ids_restore (N, L))."""
        return vit.random_masking(x, mask_ratio, noise)

    # ------------------------------------------------------------------ encoder
    def _frozen_ctx(self, frozen: bool):
        return torch.no_grad() if frozen else contextlib.nullcontext()

    def run_blocks(self, x: torch.Tensor, taps: Sequence[int] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the encoder blocks on tokens x: (N, T, D); returns the last output and the outputs after `taps`.

        Blocks below `frozen_prefix` run under no_grad so backward stops at the first trainable block.
        """
        outs = []
        for i, blk in enumerate(self.blocks):
            with self._frozen_ctx(i < self.frozen_prefix):
                x = blk(x)
            if i in taps:
                outs.append(x)
                # the next block reads a tapped output through a node of its own, as it does under FSDP2 (which
                # puts one before every block's input): its gradient is then summed with the tap's in the same
                # grouping either way (LocalMIM's forward_encoder)
                x = x.view_as(x)
        return x, outs

    def embed(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Patch-embed, add positions, mask and prepend cls: -> tokens (N, 1+L_keep, D), mask, ids_restore."""
        self.check_images(imgs)
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        with self._frozen_ctx(self.frozen_prefix > 0):
            x = self.patch_embed(imgs)
            x = x + self.pos_embed[:, 1:, :]
            x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
            cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
            x = torch.cat((cls, x), dim=1)
        return x, mask, ids_restore

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs: (N, C, H, W) -> latent (N, 1+L_keep, D), mask (N, L), ids_restore (N, L)."""
        x, mask, ids_restore = self.embed(imgs, mask_ratio, noise)
        x, _ = self.run_blocks(x)
        return self.norm(x), mask, ids_restore

    def forward_features(self, imgs: torch.Tensor, layers: Sequence[int] = ()) -> torch.Tensor | list[torch.Tensor]:
        """Unmasked encoder in patch order: imgs (N, C, H, W) -> normed tokens (N, 1+L, D).

        With `layers`, returns the raw outputs (N, 1+L, D) after those blocks instead (for dense heads).
        """
        self.check_images(imgs)
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x, outs = self.run_blocks(torch.cat((cls, x), dim=1), taps=tuple(layers))
        return outs if layers else self.norm(x)

    # ------------------------------------------------------------------ decoder
    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (N, 1+L_keep, D), ids_restore (N, L) -> pred (N, L, p*p*C)."""
        x = self.decoder_embed(x)
        n_mask = ids_restore.shape[1] + 1 - x.shape[1]
        mask_tokens = self.mask_token.expand(x.shape[0], n_mask, -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    # ------------------------------------------------------------------ loss
    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """Reconstruction target (N, L, p*p*C): pixels, per-patch normalised when norm_pix_loss."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(
        self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, loss_mode: str = "masked_only"
    ) -> torch.Tensor:
        """Per-patch MSE, averaged over masked patches (masked_only) or over every patch (all_pixels)."""
        loss = ((pred.float() - self.target(imgs).float()) ** 2).mean(dim=-1)  # (N, L)
        if loss_mode == "masked_only":
            return (loss * mask).sum() / mask.sum().clamp_min(1)
        if loss_mode == "all_pixels":
            return loss.mean()
        raise ValueError(f"unknown loss_mode '{loss_mode}'; choose one of {', '.join(LOSS_MODES)}")

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: float = 0.75,
        noise: torch.Tensor | None = None,
        loss_mode: str = "masked_only",
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs (N, C, H, W) -> (loss scalar, pred (N, L, p*p*C), mask (N, L) with 1 = removed)."""
        if loss_mode not in LOSS_MODES:
            raise ValueError(f"unknown loss_mode '{loss_mode}'; choose one of {', '.join(LOSS_MODES)}")
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask, loss_mode)
        # pred is a slice (a view) of the decoder's output; a model's output that is a view trips FSDP2's
        # warning (an in-place op on it would skip its backward hook): a copy, which replaces the view's storage
        return loss, pred.clone(), mask

    # ------------------------------------------------------------------ memory: blocks, checkpointing
    def decoder_blocks_list(self) -> list[nn.Module]:
        """The decoder's transformer blocks (LocalMIM: every tap's decoder's)."""
        return list(self.decoder_blocks)

    def transformer_blocks(self) -> list[nn.Module]:
        """Every transformer block, encoder then decoder: the units FSDP shards and checkpointing recomputes."""
        return [*self.blocks, *self.decoder_blocks_list()]

    def set_grad_checkpointing(self, enable: GradCheckpointing = True) -> int:
        """Recompute block activations in backward: True = every block (encoder and decoder), N = the first N
        encoder blocks, False = none -> the number of blocks checkpointed."""
        n = checkpoint_blocks(self.blocks, enable)
        return n + checkpoint_blocks(self.decoder_blocks_list(), enable is True)

    # ------------------------------------------------------------------ freezing API (seed 000)
    def is_encoder_param(self, name: str) -> bool:
        """True for encoder parameters (patch embed, cls token, pos embed, blocks, final norm)."""
        return name.startswith(ENCODER_PREFIXES)

    def _set_trainable(self, predicate: Callable[[str, nn.Parameter], bool]) -> None:
        for name, p in self.named_parameters():
            p.requires_grad_(name not in FIXED_PARAMS and predicate(name, p))

    def _layernorm_param_names(self, encoder_blocks_only: bool) -> set[str]:
        names = set()
        for mod_name, mod in self.named_modules():
            if not isinstance(mod, nn.LayerNorm):
                continue
            if encoder_blocks_only and not mod_name.startswith("blocks."):
                continue
            names.update(f"{mod_name}.{pn}" for pn, _ in mod.named_parameters(recurse=False))
        return names

    def unfreeze_all(self) -> None:
        """Make every parameter trainable (the fixed position embeddings stay fixed)."""
        self._set_trainable(lambda n, p: True)

    def freeze_everything_except_layernorm_encoder(self) -> None:
        """Train only the encoder blocks' LayerNorms (norm1, norm2); freeze everything else."""
        keep = self._layernorm_param_names(encoder_blocks_only=True)
        self._set_trainable(lambda n, p: n in keep)

    def freeze_everything_except_all_layernorms(self) -> None:
        """Train only LayerNorms (encoder blocks, encoder norm, decoder blocks, decoder norm)."""
        keep = self._layernorm_param_names(encoder_blocks_only=False)
        self._set_trainable(lambda n, p: n in keep)

    def freeze_encoder(self) -> None:
        """Freeze the encoder; the decoder and the mask token train."""
        self._set_trainable(lambda n, p: not self.is_encoder_param(n))

    def apply_freeze_mode(self, mode: str) -> None:
        """Apply one of FREEZE_MODES by name (the seed's --freeze_mode)."""
        actions = {
            "none": self.unfreeze_all,
            "encoder_layernorms_only": self.freeze_everything_except_layernorm_encoder,
            "layernorm_only": self.freeze_everything_except_all_layernorms,
            "encoder_only": self.freeze_encoder,
        }
        if mode not in actions:
            raise UserError(f"unknown freeze_mode '{mode}'{suggest(mode, actions)}; choose one of {', '.join(actions)}")
        actions[mode]()

    def param_group_of(self, name: str) -> str:
        """The reporting group of a parameter name, e.g. 'encoder.blocks.layernorm'."""
        if name in FIXED_PARAMS:
            return "fixed.pos_embed"
        side = "encoder" if self.is_encoder_param(name) else "decoder"
        parts = name.split(".")
        if parts[0] in ("blocks", "decoder_blocks"):
            return f"{side}.blocks.{'layernorm' if parts[2].startswith('norm') else parts[2]}"
        return f"{side}.{parts[0].removeprefix('decoder_')}"

    def param_status(self) -> dict[str, dict[str, int]]:
        """Per-group counts {group: {'trainable': n, 'frozen': n}} plus a 'total' row; fixed embeds are frozen."""
        status: dict[str, dict[str, int]] = {}
        for name, p in self.named_parameters():
            row = status.setdefault(self.param_group_of(name), {"trainable": 0, "frozen": 0})
            row["trainable" if p.requires_grad else "frozen"] += p.numel()
        order = {"encoder": 0, "decoder": 1, "fixed": 2}
        status = dict(sorted(status.items(), key=lambda kv: order.get(kv[0].split(".")[0], 1)))
        status["total"] = {k: sum(r[k] for r in status.values()) for k in ("trainable", "frozen")}
        return status

    def format_param_status(self) -> str:
        """The parameter-status table as text."""
        rows = self.param_status()
        lines = [f"{'group':<28}{'trainable':>14}{'frozen':>14}{'% trainable':>13}"]
        for group, r in rows.items():
            tot = r["trainable"] + r["frozen"]
            pct = 100.0 * r["trainable"] / tot if tot else 0.0
            if group == "total":
                lines.append("-" * 69)
            lines.append(f"{group:<28}{r['trainable']:>14,}{r['frozen']:>14,}{pct:>12.2f}%")
        return "\n".join(lines)

    def print_param_status(self) -> None:
        """Print the trainable / frozen parameter table (seed 000)."""
        print(self.format_param_status())
