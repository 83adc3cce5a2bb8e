"""Reconstruction pictures: original / masked / reconstruction / reconstruction + visible (the official demo's grid).

`mimkit visualize CHECKPOINT IMAGE...` draws it for any mimkit, official or Hugging Face MAE checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from mimkit.config import note_output
from mimkit.errors import UserError

COLUMNS = ("original", "masked", "reconstruction", "reconstruction + visible")


def _to_display(imgs: torch.Tensor, normalization=None) -> torch.Tensor:
    """(N, C, H, W) normalised with `normalization` = (mean, std) (None: the defaults, ImageNet's) -> (N, H, W, 3)
    in [0, 1]; grayscale repeated, extra bands dropped."""
    from mimkit.data.transforms import mean_std

    c = imgs.shape[1]
    if c in (1, 3):
        mean, std = mean_std(c, *(normalization or (None, None)))
    else:  # no image file has other channel counts; draw the first bands with the average statistics
        mean, std = (normalization or ([0.45] * c, [0.225] * c))
    x = imgs.float().cpu() * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    x = x.repeat(1, 3, 1, 1) if c == 1 else x[:, :3]
    if x.shape[1] < 3:
        x = torch.cat([x, x[:, -1:].expand(-1, 3 - x.shape[1], -1, -1)], dim=1)
    return x.nan_to_num(0.5).clamp(0, 1).permute(0, 2, 3, 1)  # a diverged model draws grey, not garbage


@torch.no_grad()
def reconstruct(model, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
    """Run the MAE; returns (pred_pixels (N, C, H, W), mask_pixels (N, C, H, W) with 1 = removed, note str).

    With norm_pix_loss the predictions are per-patch normalised; they are mapped back to pixels with the
    mean and variance of the original patch (the only way to show them), which the note says.
    """
    was_training = model.training
    model.eval()
    _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    model.train(was_training)
    note = ""
    if getattr(model, "norm_pix_loss", False):
        target = model.patchify(imgs)
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
        note = "norm_pix_loss: predicted patches un-normalised with each original patch's mean and std"
    p = model.patch_size
    mask_px = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, p * p * model.in_chans).to(pred.dtype))
    return model.unpatchify(pred), mask_px, note


def reconstruction_grid(model, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None,
                        title: str = "", normalization=None, row_labels: Sequence[str] | None = None) -> np.ndarray:
    """A uint8 (header + rows*(label + H), 4*W, 3) picture: one row per image, the four columns of COLUMNS.

    normalization: the (mean, std) `imgs` were normalised with; default the model's (`model.normalization`).
    row_labels: one line above each row (the image's file name); the title wraps to the picture's width.
    """
    pred, mask, note = reconstruct(model, imgs, mask_ratio, noise)
    normalization = normalization or getattr(model, "normalization", None)
    orig = _to_display(imgs, normalization)
    rec = _to_display(pred, normalization)
    m = mask[:, :1].permute(0, 2, 3, 1).cpu()
    masked = orig * (1 - m) + 0.5 * m
    pasted = orig * (1 - m) + rec * m
    k = max(1, 128 // imgs.shape[-1])  # small images are enlarged so the columns can carry their names
    rows = []
    for i in range(imgs.shape[0]):
        row = (torch.cat([orig[i], masked[i], rec[i], pasted[i]], dim=1).numpy() * 255).round().astype(np.uint8)
        row = row.repeat(k, axis=0).repeat(k, axis=1)
        if row_labels is not None:
            row = np.concatenate([_label_band(row.shape[1], row_labels[i]), row], axis=0)
        rows.append(row)
    grid = np.concatenate(rows, axis=0)
    return _with_header(grid, imgs.shape[-1] * k, [t for t in (title, note) if t])


LINE_H = 14  # pixels per text line of Pillow's default font


def _label_band(width: int, text: str) -> np.ndarray:
    """A white (LINE_H + 2, width, 3) band holding `text`, cut at the left (the file name's end stays) to fit."""
    img = Image.new("RGB", (width, LINE_H + 2), "white")
    draw = ImageDraw.Draw(img)
    text = _fit(draw, text, width - 4)
    draw.text((2, 2), text, fill="black")
    return np.asarray(img)


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    """`text`, or '...' and its longest ending that fits in `width` pixels."""
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength("..." + text) > width:
        text = text[1:]
    return "..." + text


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int) -> list[str]:
    """`text` broken at spaces (or anywhere, for a long word) into lines no wider than `width` pixels."""
    lines: list[str] = []
    line = ""
    for word in text.split(" "):
        trial = f"{line} {word}" if line else word
        if draw.textlength(trial) <= width:
            line = trial
            continue
        if line:
            lines.append(line)
        while draw.textlength(word) > width and len(word) > 1:  # a long path: cut it into pieces that fit
            cut = len(word)
            while cut > 1 and draw.textlength(word[:cut]) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line:
        lines.append(line)
    return lines


def _with_header(grid: np.ndarray, col_w: int, lines: Sequence[str]) -> np.ndarray:
    """Add a white band with the column names and the notes (wrapped to the picture's width) above the grid."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [w for text in lines for w in _wrap(measure, text, grid.shape[1] - 4)]
    band = LINE_H * (1 + len(wrapped)) + 4
    img = Image.new("RGB", (grid.shape[1], grid.shape[0] + band), "white")
    img.paste(Image.fromarray(grid), (0, band))
    draw = ImageDraw.Draw(img)
    for j, name in enumerate(COLUMNS):
        draw.text((j * col_w + 2, 2), name if col_w >= 128 else name.split()[0], fill="black")
    for k, text in enumerate(wrapped):
        draw.text((2, 2 + LINE_H * (k + 1)), text, fill="black")
    return np.asarray(img)


def save_png(picture: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 (H, W, 3) array as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path)
    return path


class ReconstructionHook:
    """Engine hook: after every `every` epochs (and at the end: finish()) draw fixed images with a fixed mask."""

    def __init__(self, images: torch.Tensor, out_dir: Path, every: int, mask_ratio: float, logger, is_main: bool,
                 epochs: int, normalization=None) -> None:
        self.images = images
        self.normalization = normalization  # (mean, std) of the training transform; None = ImageNet's
        self.out_dir = Path(out_dir)
        self.every = every
        self.mask_ratio = mask_ratio
        self.logger = logger
        self.is_main = is_main
        self.epochs = epochs
        self.noise: torch.Tensor | None = None
        self.last_path: Path | None = None
        self.drawn_at: int | None = None  # the optimiser step of the last picture
        self.started_at: int | None = None  # the step this fit started from (None: it trained nothing)

    def on_train_start(self, trainer) -> None:
        self.started_at = trainer.state.step
        # The mask comes from its own generator: drawing pictures never moves the training RNG.
        gen = torch.Generator().manual_seed(1234)
        self.noise = torch.rand(self.images.shape[0], trainer.model.num_patches, generator=gen)
        if trainer.state.epoch == 0 and trainer.state.batch == 0:
            self.draw(trainer, "init")

    def on_epoch_end(self, trainer, epoch: int) -> None:
        last = epoch + 1 == self.epochs
        if last or (self.every and (epoch + 1) % self.every == 0):
            self.draw(trainer, f"epoch-{epoch + 1}")

    def finish(self, trainer) -> None:
        """After a fit that trained: the picture of the weights the run ended with, when the last one is older (a
        stop at --max_steps inside an epoch), so the run's summary never points at an earlier picture."""
        step = trainer.state.step
        if self.started_at is not None and step not in (self.started_at, self.drawn_at):
            self.draw(trainer, f"step-{step}")

    def draw(self, trainer, tag: str) -> None:
        if not self.is_main:
            return
        model = trainer.model
        dev = next(model.parameters()).device
        pic = reconstruction_grid(model, self.images.to(dev), self.mask_ratio, self.noise.to(dev), title=tag,
                                  normalization=self.normalization)
        self.last_path = save_png(pic, self.out_dir / f"recon_{tag}.png")
        self.drawn_at = trainer.state.step
        self.logger.image("reconstruction", pic, trainer.state.step)


# ---------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `mimkit visualize`."""
    p.add_argument("checkpoint", help="mimkit, official MAE or Hugging Face ViTMAE checkpoint: a file, or a run / "
                   "checkpoint / save_pretrained folder")
    p.add_argument("images", nargs="+", help="image files to reconstruct")
    p.add_argument("--model", default=None, help="model name (default: the checkpoint's)")
    p.add_argument("--input_size", type=int, default=None, help="image size (default: the checkpoint's)")
    p.add_argument("--mask_ratio", type=float, default=0.75, help="fraction of patches removed")
    p.add_argument("--seed", type=int, default=0, help="seed of the random mask")
    p.add_argument("--output", default=None,
                   help="PNG to write (default: reconstruction.png in --output_dir)")
    p.add_argument("--output_dir", default=None, help="folder for reconstruction.png, as every command takes "
                   "(default: a new runs/visualize/<timestamp>)")


def run(args: argparse.Namespace) -> int:
    """`mimkit visualize`: load a checkpoint, reconstruct the images, write the PNG."""
    from mimkit.data.images import read_image
    from mimkit.data.transforms import eval_transform, normalization_of
    from mimkit.models.loading import model_from_checkpoint

    if not 0.0 <= args.mask_ratio < 1.0:
        raise UserError(f"--mask_ratio must be in [0, 1), got {args.mask_ratio}")
    from mimkit.engine.runfolder import check_output_file

    check_output_file(args.output, "--output", (".png",), "the picture", strict=True)  # before the model loads
    paths = [Path(p) for p in args.images]
    for p in paths:
        if not p.is_file():
            raise UserError(f"image not found: {p}")
    output_dir = getattr(args, "output_dir", None)
    if args.output is not None and output_dir is not None:
        raise UserError(f"give --output ({args.output}) or --output_dir ({output_dir}), not both")
    # a file without a decoder is refused before it loads (no load line about a fresh decoder first)
    model, info = model_from_checkpoint(args.checkpoint, args.model, args.input_size, decoder="needed")
    if not hasattr(model, "decoder_pred"):  # LocalMIM predicts HOG features: there are no pixels to draw
        raise UserError(f"{args.checkpoint} holds a {type(model).__name__} ({info.split(' ')[0]}), which predicts "
                        "HOG features, not pixels: reconstruction pictures need an MAE checkpoint")
    if getattr(model, "load_report", None) is not None and model.load_report.decoder_fresh:
        raise UserError(f"{args.checkpoint} holds no MAE decoder (an encoder-only, linprobe, finetune or segment "
                        "checkpoint): reconstructions need the pretraining checkpoint (pretrain / continual)")
    from mimkit.data.images import scan_images

    for note in scan_images([str(p) for p in paths]):  # transparency, 12-bit data: said once, not per image
        print(f"note: {note}")
    tf = eval_transform(model.img_size, model.in_chans, *normalization_of(model))  # the checkpoint's mean/std
    imgs = []
    for p in paths:
        try:
            imgs.append(tf(read_image(p, "L" if model.in_chans == 1 else "RGB")))
        except (OSError, ValueError, SyntaxError) as e:
            raise UserError(f"cannot read image {p}: {e}") from None
    batch = torch.stack(imgs)
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.rand(batch.shape[0], model.num_patches, generator=gen)
    pic = reconstruction_grid(model, batch, args.mask_ratio, noise, title=f"{info} mask {args.mask_ratio:g}",
                              row_labels=[p.name for p in paths])
    if output_dir is not None:
        target = Path(output_dir) / "reconstruction.png"
        if target.exists():
            raise UserError(f"{target} exists: a run never writes over an earlier one; choose another --output_dir "
                            "(or name the file with --output)")
        out = save_png(pic, target)
    elif args.output is None:
        from mimkit.config import new_run_dir

        out = save_png(pic, new_run_dir("visualize") / "reconstruction.png")
    else:
        if Path(args.output).exists():
            print(f"replacing {args.output} (you named it with --output)")
        out = save_png(pic, args.output)
    note_output(out)
    print(f"wrote {out}")
    return 0

