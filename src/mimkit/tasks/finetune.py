r"""`mimkit finetune`: end-to-end classification fine-tuning of an MAE encoder, the official recipe, on THE loop.

    mimkit finetune --finetune runs/demo --data_path digits      # built-in data: preset finetune/digits.yaml beneath
    mimkit finetune --finetune mae_pretrain_vit_base.pth --data_path /imagenet --model mae_vit_base_patch16 \
        --batch_size 32 --accum_iter 4 --blr 5e-4 --layer_decay 0.65 --weight_decay 0.05 --drop_path 0.1 \
        --mixup 0.8 --cutmix 1.0 --reprob 0.25 --dist_eval
    mimkit finetune --data_path digits --eval --resume runs/finetune/<timestamp>/checkpoints/best.pt

A timm VisionTransformer with the encoder's weights (position embeddings interpolated when --input_size
differs), global average pooling + fc_norm (or --cls_token), head at trunc_normal(2e-5); AdamW over
layer-decay groups (lr scale layer_decay ** (depth + 1 - layer_id)), warmup + cosine to --min_lr, drop path,
RandAugment + random erasing (timm create_transform), mixup / cutmix / label smoothing (timm Mixup,
SoftTargetCrossEntropy, LabelSmoothingCrossEntropy), --clip_grad; val/ after every epoch, best.pt kept.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from mimkit import config as C
from mimkit.tasks.evaluation import config as EC
from mimkit.tasks.evaluation import common as E
from mimkit.config import add_arguments as _add_arguments
from mimkit.config import config_from_args
from mimkit.models.checkpointing import apply_grad_checkpointing, grad_checkpointing_line
from mimkit.tasks.preflight import check_memory, check_resumed_settings, meta_images, meta_labels
from mimkit.tasks.pretrain.setup import seed_everything


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The official main_finetune.py flags, a config file and dotted overrides."""
    _add_arguments(p, EC.FINETUNE_FLAGS, EC.FinetuneConfig)


def run(args: argparse.Namespace) -> int:
    """CLI entry: config, then fine-tune."""
    cfg = config_from_args(args, EC.FINETUNE_FLAGS, EC.FinetuneConfig, demo_preset=None,
                           data_presets=EC.FINETUNE_PRESETS, checkpoint_size=True)
    finetune(cfg)
    return 0


def layer_id(name: str, depth: int) -> int:
    """The official (BEiT) layer of a ViT parameter: 0 embeddings, i + 1 block i, depth + 1 everything after."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups of util/lr_decay.py: lr_scale = layer_decay ** (depth + 1 - layer_id), no weight decay on
    1-D parameters, the cls token and the position embedding.

    Not timm's param_groups_layer_decay: its group matcher gives the final `norm` of a cls-token model its
    own layer (scale layer_decay instead of the official 1.0).
    """
    depth = len(model.blocks)
    skip = set(model.no_weight_decay())
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name in skip
        lid = layer_id(name, depth)
        key = f"layer_{lid}_{'no_decay' if no_decay else 'decay'}"
        g = groups.setdefault(key, {"params": [], "names": [], "lr_scale": layer_decay ** (depth + 1 - lid),
                                    "weight_decay": 0.0 if no_decay else weight_decay, "group": key})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


def build_mixup(cfg, nb_classes: int):
    """timm Mixup when --mixup / --cutmix is on (it also smooths the labels), else None."""
    from timm.data import Mixup

    a = cfg.data.augmentation
    if not (a.mixup > 0 or a.cutmix > 0 or a.cutmix_minmax is not None):
        return None
    return Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, cutmix_minmax=a.cutmix_minmax, prob=a.mixup_prob,
                 switch_prob=a.mixup_switch_prob, mode=a.mixup_mode, label_smoothing=a.smoothing,
                 num_classes=nb_classes)


def build_criterion(cfg, mixup) -> torch.nn.Module:
    """SoftTargetCrossEntropy with mixup, LabelSmoothingCrossEntropy with --smoothing, else cross-entropy."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup is not None:
        return SoftTargetCrossEntropy()
    if cfg.data.augmentation.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.data.augmentation.smoothing)
    return torch.nn.CrossEntropyLoss()


def finetune_step(criterion: torch.nn.Module, mixup: Optional[Callable]) -> Callable:
    """step_fn for the engine: (mixed) images -> logits -> loss."""

    def step(model, batch):
        x, y = batch["images"], batch["labels"]
        if mixup is not None:
            if len(x) % 2:  # timm's Mixup pairs images; a batch that lost an unreadable image drops one more
                x, y = x[:-1], y[:-1]
            x, y = mixup(x, y)
        return criterion(model(x), y), {}

    return step


def build_classifier(cfg, size: tuple[int, int], resume: Optional[dict], nb_classes: int):
    """(timm ViT classifier, description): encoder weights from model.finetune, or the shape of a resume."""
    from mimkit.models.heads import vit_classifier

    encoder_path = cfg.model.finetune or ((resume or {}).get("config") or {}).get("model", {}).get("finetune")
    if encoder_path is None and not cfg.model.random_init:
        from mimkit.errors import ConfigError

        raise ConfigError("give --finetune PRETRAINED_CHECKPOINT (the encoder's architecture)")
    encoder, desc = E.load_encoder(encoder_path, cfg.model.type, size, cfg.model.random_init, cfg.misc.seed)
    E.adopt_normalization(cfg, encoder)
    model = vit_classifier(encoder, nb_classes, cfg.model.global_pool, cfg.model.drop_path)
    pool = "global average pool + fc_norm" if cfg.model.global_pool else "cls token"
    return model, f"{desc}, ViT classifier ({pool}, {nb_classes} classes)"


def vit_arch_of(model) -> dict:
    """The timm ViT arguments of a built classifier (what `mimkit export` rebuilds it from)."""
    blk = model.blocks[0]
    return dict(img_size=list(model.patch_embed.img_size), patch_size=model.patch_embed.patch_size[0],
                in_chans=model.patch_embed.proj.in_channels, num_classes=model.num_classes,
                global_pool=model.global_pool, embed_dim=model.embed_dim, depth=len(model.blocks),
                num_heads=blk.attn.num_heads, mlp_ratio=blk.mlp.fc1.out_features / model.embed_dim,
                **({} if blk.norm1.eps == 1e-6 else {"layer_norm_eps": float(blk.norm1.eps)}))


def source_encoder_arch(cfg, resume: Optional[dict]) -> Optional[dict]:
    """{type, kwargs} of the MAE model the classifier's encoder was taken from (None for a random init)."""
    if resume is not None:  # a resumed or evaluated run keeps what its first run recorded
        return ((resume.get("config") or {}).get("model", {}).get("arch") or {}).get("source_encoder")
    if not cfg.model.finetune or cfg.model.random_init:
        return None
    from mimkit.models.loading import architecture_of

    arch = architecture_of(cfg.model.finetune)
    m = (arch or {}).get("model") or {}
    return {"type": m["type"], "kwargs": dict(m.get("kwargs") or {})} if m.get("type") else None


def finetune(cfg) -> dict:
    """Fine-tune (or with misc.eval only evaluate) as cfg says; returns the results' metrics."""
    from mimkit.data.transforms import eval_transform, finetune_transform
    from mimkit.engine import distributed as D
    from mimkit.engine.logging import RunLogger
    from mimkit.engine.fsdp import building, deferred_init, place_model, shard_folder, shardable_blocks
    from mimkit.engine.optim import build_adamw, scaled_lr
    from mimkit.engine.precision import amp_decision

    # 1. validate config, data and checkpoint before any training
    EC.check_classifier_config(cfg, "finetune")
    dist = D.init_distributed(cfg.misc.device)
    seed_everything(cfg.misc.seed)
    size = C.input_size(cfg)
    a = cfg.data.augmentation
    resume = E.read_resume(cfg)
    check_resumed_settings(cfg, "finetune", resume)  # a resume keeps its run-defining settings, before any work
    saved_classes = None
    if resume is not None:
        saved_classes = (resume.get("config") or {}).get("model", {}).get("nb_classes")
    probe_train, _ = E.open_labelled(cfg.data.data_path, None, None)
    nb_classes = E.check_nb_classes(cfg.model.nb_classes or saved_classes, probe_train.classes)
    # --strategy fsdp over several ranks: built on meta (recorded), materialised shard by shard below
    recorder = None if cfg.misc.eval else deferred_init(cfg.distributed.strategy, dist.world_size)
    with building(recorder):
        model, desc = build_classifier(cfg, size, resume, nb_classes)
    if cfg.distributed.strategy == "fsdp":
        shardable_blocks(model, cfg.model.type or "the classifier")  # one line before any work
    sharded_resume = bool((resume or {}).get("sharded"))
    if sharded_resume:
        shard_folder(resume, cfg.misc.resume, Path(cfg.checkpointing.checkpoint_dir
                                                   or Path(cfg.misc.output_dir or ".") / "checkpoints"))
    in_chans = model.patch_embed.proj.in_channels
    aa = None if a.aa in (None, "none") else a.aa
    train_tf = finetune_transform(size, aa, a.reprob, a.remode, a.recount, a.color_jitter, in_chans,
                                  scale=(a.crop_scale_min, a.crop_scale_max), hflip=0.5 if a.hflip else 0.0,
                                  mean=cfg.data.mean, std=cfg.data.std)
    train_set, val_set = E.open_labelled(cfg.data.data_path, train_tf,
                                         eval_transform(size, in_chans, cfg.data.mean, cfg.data.std))
    OmegaConf.set_struct(cfg, False)
    cfg.model.nb_classes = nb_classes  # written into the saved config: export and --eval rebuild from it
    cfg.model.arch = vit_arch_of(model)
    source = source_encoder_arch(cfg, resume)
    if source:  # the MAE the encoder came from: later commands rebuild that model, decoder included
        cfg.model.arch["source_encoder"] = source
    lr = cfg.optimization.lr or scaled_lr(cfg.optimization.base_lr, cfg.optimization.batch_size,
                                          cfg.optimization.accum_iter, dist.world_size)
    cfg.optimization.lr = lr
    OmegaConf.set_struct(cfg, True)
    n_ckpt = apply_grad_checkpointing(model, cfg.model.grad_checkpointing, cfg.model.type or "the classifier")
    placed: list[str] = []  # logged once the run's log is open
    if n_ckpt:
        placed.append(grad_checkpointing_line(model, cfg.model.grad_checkpointing, n_ckpt))
    bs = cfg.optimization.batch_size
    # traced before sharding, as pretrain and segment do: a meta-device trace through fully_shard's hooks leaves
    # its parameters half initialised (the first real forward then fails in FSDP's all-gather)
    memory = None if cfg.misc.eval else check_memory(
        f"finetune at batch {bs}, input {size[0]}x{size[1]}", model,
        lambda m: F.cross_entropy(m(meta_images(bs, size, in_chans)), meta_labels(bs)), dist.device,
        "lower --batch_size and raise --accum_iter (the same effective batch), a smaller --input_size, or "
        "--grad_checkpointing; finetune/digits.yaml's sizes fit a CPU",
        strategy=cfg.distributed.strategy, world_size=dist.world_size)
    place_model(model, recorder, dist.device, amp_decision(cfg.misc.amp, dist.device)[0], cfg.distributed.strategy,
                dist.world_size, placed.append, cfg.model.type or "the classifier", weights_needed=not sharded_resume)
    C.resolve_output_dir(cfg, "finetune")

    if cfg.misc.eval:
        return E.evaluate_only(cfg, "finetune", model, val_set, resume, dist, desc)

    # 2. set up: run folder, seeds, layer-decay AdamW, mixup and the loss
    run_log = RunLogger(cfg.misc.output_dir, enabled=dist.is_main, print_freq=cfg.logging.print_freq,
                        tracking=cfg.logging, config=C.to_container(cfg))
    if dist.is_main:
        C.save_config(cfg, f"{cfg.misc.output_dir}/config.yaml")
    for line in placed:
        run_log.info(line)
    seed_everything(cfg.misc.seed + dist.rank)  # augmentation, mixup and drop path differ across ranks
    o = cfg.optimization
    groups = layer_decay_groups(model, o.weight_decay, o.layer_decay)
    optimizer = build_adamw(groups, lr, (o.adam_beta1, o.adam_beta2), dist.device)
    mixup = build_mixup(cfg, nb_classes)
    criterion = build_criterion(cfg, mixup)
    run_log.info(memory)
    run_log.info(f"criterion {type(criterion).__name__}; mixup {'on' if mixup else 'off'}; "
                 f"{len(groups)} parameter groups, layer decay {o.layer_decay}")

    # 3. train with per-epoch evaluation, 4. report
    return E.train_classifier(cfg, "finetune", model, optimizer, train_set, val_set,
                              finetune_step(criterion, mixup), model, lr, dist, run_log, cfg.data.num_workers,
                              resume, desc)
