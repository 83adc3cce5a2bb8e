"""Peak memory of a training step, told before any work: weights, gradients, AdamW state and activations.

An estimate from the shapes alone (no model run), sized to refuse a run that cannot fit -- the kernel killing a
process at 24 GB says nothing -- not to predict the last megabyte. Counted in fp32 (4 bytes), the conservative
case; AMP stores some activations in half precision and needs less.

    vit_activations(batch, tokens, dim, depth, heads, mlp_ratio)   saved for backward by the encoder's blocks
    upernet_activations(batch, crop, channels, levels)             UPerHead + FCN aux head at 1/4 .. 1/32
    training_peak(params, trainable, activations)                  the sum, weights to optimiser state
    available_bytes(device)                                        what the machine has free now
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

FP32 = 4
# measured / estimated growth of one UperNet step (mae_vit_demo_patch8, batch 2, channels 512, CPU) at crop 128
# and 256 was 0.97 and 1.21 (docs/cluster.md); the larger ratio, so a refusal errs toward "does not fit"
CALIBRATION = 1.2


def vit_activations(batch: int, tokens: int, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0) -> int:
    """Bytes a ViT's blocks keep for backward: per block two LayerNorm inputs, q/k/v, the attention output and
    projection, the MLP's hidden layer twice (fc1 out, GELU out) and its output, (N, T, D) each, plus four
    (N, heads, T, T) attention maps (scores, softmax, dropout, the softmax gradient: the CPU's math kernel), times
    CALIBRATION."""
    per_token = dim * (2 + 3 + 2 + 2 * mlp_ratio + 1)
    per_block = batch * (tokens * per_token + 4 * heads * tokens * tokens)
    return int(per_block * depth * FP32 * CALIBRATION)


def upernet_activations(batch: int, crop: tuple[int, int], channels: int, levels: int = 4) -> int:
    """Bytes UperNet keeps for backward: at each of `levels` scales (1/4 ... 1/32) a lateral and an FPN conv with
    BatchNorm and ReLU (about 6 (N, C, h, w) tensors), the fused 4C concat at 1/4 and its conv (5 more at 1/4)."""
    h, w = crop
    quarter = batch * channels * (h // 4) * (w // 4)
    pyramid = sum(quarter / 4 ** i for i in range(levels))
    return int((6 * pyramid + 5 * 4 * quarter) * FP32 * CALIBRATION)


def training_peak(params: int, trainable: int, activations: int) -> int:
    """Bytes at the peak of a step: weights + gradients and two AdamW moments of what trains + activations."""
    return int((params + 3 * trainable) * FP32 + activations)


def available_bytes(device: str = "cpu") -> Optional[int]:
    """Memory free for this run now: the GPU's free memory, else MemAvailable (Linux), else None (unknown)."""
    if str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info(torch.device(device) if ":" in str(device) else None)
            return int(free)
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


@dataclass
class Footprint:
    """An estimate and its parts, for the start-up line and the refusal."""

    weights: int
    optimizer: int
    activations: int
    available: Optional[int]

    @property
    def peak(self) -> int:
        return self.weights + self.optimizer + self.activations

    @property
    def fits(self) -> bool:
        """True when the peak fits in 90 % of what is free (or nothing is known about the machine)."""
        return self.available is None or self.peak <= 0.9 * self.available

    def line(self) -> str:
        """'estimated peak memory 39.1 GB (weights 0.4, gradients + AdamW 1.2, activations 37.5) of 24.0 GB free'"""
        free = f" of {gb(self.available)} free" if self.available is not None else ""
        return (f"estimated peak memory {gb(self.peak)} (weights {gb(self.weights)}, gradients + AdamW "
                f"{gb(self.optimizer)}, activations {gb(self.activations)}){free}")


def footprint(params: int, trainable: int, activations: int, device: str = "cpu") -> Footprint:
    """The Footprint of a step (see training_peak) against what `device` has free."""
    return Footprint(params * FP32, 3 * trainable * FP32, activations, available_bytes(device))


def gb(n: Optional[float]) -> str:
    """Bytes as '1.2 GB'."""
    return "?" if n is None else f"{n / 1e9:.1f} GB"
