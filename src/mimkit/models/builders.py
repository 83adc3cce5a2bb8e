"""Registered MAE builders: the official B/L/H recipes, CPU-sized tiny/small/demo presets, the seeds' aliases."""

from __future__ import annotations

from mimkit.models.mae import MaskedAutoencoderViT
from mimkit.models.register import register_alias, register_model

# Constructor options a user may override on any MAE preset.
MAE_OPTIONS = (
    "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "decoder_embed_dim",
    "decoder_depth", "decoder_num_heads", "mlp_ratio", "norm_pix_loss", "drop_path", "layer_norm_eps",
    "decoder_mlp_ratio",
    "init_values",  # encoder layer scale (an MMSegmentation MAE backbone); unset = none, the official layout
)


def _mae(defaults: dict, overrides: dict) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(**{**defaults, **overrides})


def _preset(fn):
    fn.accepts = MAE_OPTIONS
    return register_model(fn)


@_preset
def mae_vit_tiny_patch16(**kw) -> MaskedAutoencoderViT:
    """ViT-Ti/16 encoder (192-d, 12 blocks, 3 heads), decoder 128-d, 4 blocks, 4 heads: trains on a CPU."""
    return _mae(dict(patch_size=16, embed_dim=192, depth=12, num_heads=3,
                     decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4), kw)


@_preset
def mae_vit_small_patch16(**kw) -> MaskedAutoencoderViT:
    """ViT-S/16 encoder (384-d, 12 blocks, 6 heads), decoder 256-d, 4 blocks, 8 heads."""
    return _mae(dict(patch_size=16, embed_dim=384, depth=12, num_heads=6,
                     decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8), kw)


@_preset
def mae_vit_base_patch16(**kw) -> MaskedAutoencoderViT:
    """ViT-B/16 encoder, decoder 512-d, 8 blocks, 16 heads (MAE paper)."""
    return _mae(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12,
                     decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16), kw)


@_preset
def mae_vit_large_patch16(**kw) -> MaskedAutoencoderViT:
    """ViT-L/16 encoder, decoder 512-d, 8 blocks, 16 heads (MAE paper)."""
    return _mae(dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                     decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16), kw)


@_preset
def mae_vit_huge_patch14(**kw) -> MaskedAutoencoderViT:
    """ViT-H/14 encoder, decoder 512-d, 8 blocks, 16 heads (MAE paper)."""
    return _mae(dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16,
                     decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16), kw)


@_preset
def mae_vit_giant_patch14(**kw) -> MaskedAutoencoderViT:
    """ViT-g/14 encoder (timm's vit_giant: 1408-d, 40 blocks, 16 heads, mlp ratio 48/11; 1.0B parameters),
    the official decoder (512-d, 8 blocks, 16 heads, mlp ratio 4). Too big for one GPU's AdamW state at
    fp32 on 24-48 GB: --strategy fsdp, --grad_checkpointing."""
    return _mae(dict(patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11,
                     decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, decoder_mlp_ratio=4.0), kw)


@_preset
def mae_vit_gigantic_patch14(**kw) -> MaskedAutoencoderViT:
    """ViT-G/14 encoder (timm's vit_gigantic: 1664-d, 48 blocks, 16 heads, mlp ratio 64/13; 1.8B parameters),
    the official decoder (512-d, 8 blocks, 16 heads, mlp ratio 4): --strategy fsdp over several GPUs."""
    return _mae(dict(patch_size=14, embed_dim=1664, depth=48, num_heads=16, mlp_ratio=64 / 13,
                     decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, decoder_mlp_ratio=4.0), kw)


@_preset
def mae_vit_demo_patch8(**kw) -> MaskedAutoencoderViT:
    """The demo's model: ViT-Ti width (192-d, 3 heads) with 6 blocks, patch 8, 64 px; decoder 128-d, 2 blocks,
    4 heads (3.2M parameters: `mimkit pretrain` trains it on a CPU in minutes)."""
    return _mae(dict(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3,
                     decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4), kw)


@_preset
def mae_vit_nano_patch8(**kw) -> MaskedAutoencoderViT:
    """The continual demo's model: 96-d, 4 blocks, 3 heads, patch 8, 64 px; decoder 64-d, 1 block, 2 heads."""
    return _mae(dict(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3,
                     decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2), kw)


@_preset
def mae_vit_nano_patch4_dec64d2b(**kw) -> MaskedAutoencoderViT:
    """The 32 px built-in sets' model (pretrain/digits.yaml, pretrain/photos.yaml, benchmarks/pretraining_pays.py):
    the nano encoder (96-d, 4 blocks, 3 heads) at patch 4, 32 px; decoder 64-d, 2 blocks, 2 heads (the official
    `_dec512d8b` suffix style: decoder width and depth)."""
    return _mae(dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3,
                     decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=2), kw)


@_preset
def mae_vit(**kw) -> MaskedAutoencoderViT:
    """Any MAE ViT, every size from its kwargs (the name of checkpoints that match no preset, e.g. a Hugging Face
    config of another width); unset sizes are ViT-B/16's."""
    return _mae(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12,
                     decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16), kw)


for _size, _patch in (("base", 16), ("large", 16), ("huge", 14)):
    # official names (facebookresearch/mae models_mae.py) and seed 000's continual names
    register_alias(f"mae_vit_{_size}_patch{_patch}_dec512d8b", f"mae_vit_{_size}_patch{_patch}")
    register_alias(f"continual_mae_vit_{_size}_patch{_patch}", f"mae_vit_{_size}_patch{_patch}")
