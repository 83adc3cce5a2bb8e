"""`mimkit linprobe`: linear probe of a frozen encoder, the official MAE recipe, on THE engine loop.

    mimkit linprobe --finetune runs/demo --data_path digits    # built-in data: preset linprobe/digits.yaml beneath
    mimkit linprobe --finetune mae_pretrain_vit_base.pth --data_path /imagenet --batch_size 512 --blr 0.1
    mimkit linprobe --finetune ... --data_path ... --eval --resume runs/linprobe/<timestamp>/checkpoints/best.pt

Head: BatchNorm1d(affine=False) + Linear on the cls token (or, with --global_pool, the layer-normed mean of
the patch tokens); LARS (or --opt sgd), lr = blr * batch / 256, warmup + cosine, top-1 / top-5 on val/
after every epoch, best.pt kept. The encoder is frozen and stays bitwise unchanged. With --no_aug the
features are computed once and the probe trains on the cache (minutes instead of hours).
"""

from __future__ import annotations

import argparse

import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset

from mimkit import config as C
from mimkit.tasks.evaluation import config as EC
from mimkit.tasks.evaluation import common as E
from mimkit.config import add_arguments as _add_arguments
from mimkit.config import config_from_args
from mimkit.tasks.pretrain.setup import seed_everything


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The official main_linprobe.py flags, a config file and dotted overrides."""
    _add_arguments(p, EC.LINPROBE_FLAGS, EC.LinprobeConfig)


def run(args: argparse.Namespace) -> int:
    """CLI entry: config, then probe."""
    cfg = config_from_args(args, EC.LINPROBE_FLAGS, EC.LinprobeConfig, demo_preset=None,
                           data_presets=EC.LINPROBE_PRESETS, checkpoint_size=True)
    probe(cfg)
    return 0


class FeatureSet(Dataset):
    """Cached features: item i is (features[i] (D,), label[i]), as an image dataset's (image, label)."""

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> None:
        self.feats, self.labels, self.classes = feats, labels, classes

    def __len__(self) -> int:
        return len(self.feats)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.feats[i], int(self.labels[i])


@torch.no_grad()
def cache_features(model, dataset, batch_size: int, device: torch.device) -> FeatureSet:
    """Pooled frozen features of every image, once: (N, D) float32 on CPU."""
    from torch.utils.data import DataLoader

    from mimkit.data.datasets import collate_batch

    feats, labels = [], []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_batch):
            if len(batch["images"]):
                feats.append(model.features(batch["images"].to(device)).float().cpu())
                labels.append(batch["labels"])
    return FeatureSet(torch.cat(feats), torch.cat(labels), list(dataset.classes))


def probe_from_checkpoint(obj: dict, sd: dict):
    """Rebuild a `mimkit linprobe` checkpoint's LinearProbe (encoder architecture from its config), load it
    strictly; in eval mode."""
    from mimkit.errors import CheckpointError
    from mimkit.models import create_model
    from mimkit.models.heads import LinearProbe

    cfg = obj.get("config") or {}
    arch = ((cfg.get("model") or {}).get("arch") or {}).get("probe_encoder")
    if not arch:
        raise CheckpointError("this linear-probe checkpoint's config has no model.arch.probe_encoder (the encoder's "
                              "architecture, recorded by newer runs); re-run `mimkit linprobe` to export the probe")
    size = (cfg.get("data") or {}).get("input_size", 224)
    encoder = create_model(arch["type"], **{**arch.get("kwargs", {}),
                                            "img_size": tuple(size) if isinstance(size, list) else size})
    model = LinearProbe(encoder, sd["head.1.weight"].shape[0], bool(cfg["model"].get("global_pool", False)))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"linear-probe checkpoint does not fit its architecture: {str(e)[:200]}") from None
    return model.eval()


def probe_step(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Cross-entropy of the probe on images (N, C, H, W) or cached features (N, D)."""
    return torch.nn.functional.cross_entropy(model(batch["images"]), batch["labels"]), {}


def build_optimizer(cfg, params, lr: float) -> torch.optim.Optimizer:
    """LARS (official) or SGD with momentum over the head's parameters."""
    from mimkit.engine.lars import LARS

    o = cfg.optimization
    if o.opt == "lars":
        return LARS(params, lr=lr, weight_decay=o.weight_decay, momentum=o.momentum)
    return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)


def probe(cfg) -> dict:
    """Train (or with misc.eval only evaluate) the linear probe; returns the results' metrics."""
    from mimkit.data.transforms import eval_transform, pretrain_transform
    from mimkit.engine import distributed as D
    from mimkit.engine.logging import RunLogger
    from mimkit.engine.optim import scaled_lr
    from mimkit.models.heads import LinearProbe
    from mimkit.tasks.preflight import check_resumed_settings

    # 1. validate config, data and checkpoint before any training
    EC.check_classifier_config(cfg, "linprobe")
    dist = D.init_distributed(cfg.misc.device)
    seed_everything(cfg.misc.seed)
    size = C.input_size(cfg)
    resume = E.read_resume(cfg)
    check_resumed_settings(cfg, "linprobe", resume)  # a resume keeps its run-defining settings, before any work
    encoder_path = cfg.model.finetune or ((resume or {}).get("config") or {}).get("model", {}).get("finetune")
    encoder, desc = E.load_encoder(encoder_path, cfg.model.type, size, cfg.model.random_init, cfg.misc.seed)
    aug = cfg.data.augmentation
    mean, std = E.adopt_normalization(cfg, encoder)
    val_tf = eval_transform(size, encoder.in_chans, mean, std)
    train_tf = (pretrain_transform(size, encoder.in_chans, (aug.crop_scale_min, aug.crop_scale_max), aug.hflip,
                                   mean, std) if aug.enabled else val_tf)
    train_set, val_set = E.open_labelled(cfg.data.data_path, train_tf, val_tf)
    nb_classes = E.check_nb_classes(cfg.model.nb_classes, train_set.classes)
    model = LinearProbe(encoder, nb_classes, cfg.model.global_pool).to(dist.device)
    desc += f", linear probe on the {'mean patch token' if cfg.model.global_pool else 'cls token'}"
    lr = cfg.optimization.lr or scaled_lr(cfg.optimization.base_lr, cfg.optimization.batch_size,
                                          cfg.optimization.accum_iter, dist.world_size)
    OmegaConf.set_struct(cfg, False)
    cfg.optimization.lr = lr  # the derived value goes into the saved config
    cfg.model.nb_classes = nb_classes
    cfg.model.arch = {"probe_encoder": E.encoder_arch(encoder_path, encoder)}  # `mimkit export` rebuilds from it
    OmegaConf.set_struct(cfg, True)

    C.resolve_output_dir(cfg, "linprobe")
    if cfg.misc.eval:
        return E.evaluate_only(cfg, "linprobe", model, val_set, resume, dist, desc)

    from mimkit.tasks.preflight import check_memory, meta_images, meta_labels

    bs, chans = cfg.optimization.batch_size, encoder.in_chans
    memory = check_memory(  # the head's optimiser is SGD / LARS: one momentum buffer, counted as AdamW's two
        f"linprobe at batch {bs}, input {size[0]}x{size[1]}", model,
        lambda m: probe_step(m, {"images": meta_images(bs, size, chans), "labels": meta_labels(bs)})[0],
        dist.device, "lower --batch_size / --input_size; linprobe/digits.yaml's sizes fit a CPU")

    # 2. set up: run folder, seeds, the cache when there is no augmentation, the head's optimiser
    run_log = RunLogger(cfg.misc.output_dir, enabled=dist.is_main, print_freq=cfg.logging.print_freq,
                        tracking=cfg.logging, config=C.to_container(cfg))
    if dist.is_main:
        C.save_config(cfg, f"{cfg.misc.output_dir}/config.yaml")
    run_log.info(memory)
    seed_everything(cfg.misc.seed + dist.rank)
    num_workers = cfg.data.num_workers
    if not aug.enabled:
        run_log.info("no augmentation: computing the frozen features once")
        train_set = cache_features(model, train_set, cfg.optimization.batch_size, dist.device)
        val_set = cache_features(model, val_set, cfg.optimization.batch_size, dist.device)
        num_workers = 0  # the cache is in memory
    optimizer = build_optimizer(cfg, model.head.parameters(), lr)

    # 3. train with per-epoch evaluation, 4. report
    return E.train_classifier(cfg, "linprobe", model, optimizer, train_set, val_set, probe_step, model,
                              lr, dist, run_log, num_workers, resume, desc)
