"""Anti-forgetting methods as pieces of THE loop: a step function and hooks with state_dict / load_state_dict.

    ce     cross-entropy over every class seen so far (naive fine-tuning, the baseline that forgets)
    kd     distillation from a reference: the frozen previous-task model (LwF's "swap and freeze"), or with
           --ema_mode an EMA of the student; cls_only = the reference's head on the student's current features
    mask   masked-feature distillation: the student's features with mask_ratio of their channels replaced by a
           token, through the head, matched to the reference's logits; the inverse-mask logits (detached) are
           added to the masked output (v1) or subtracted from the target (v2), as seed 004 describes
    er     experience replay from a reservoir buffer (Mammoth's ER: sample a batch, then add the current one)

EMA rules are mmengine's (`mmengine/model/averaged_model.py`): m weights the NEW value, avg <- (1 - m) avg + m
model (ExponentialMovingAverage); anne: m_t = max(m, gamma / (gamma + t)), gamma = 100 (MomentumAnnealingEMA);
sto: avg <- avg + (model - avg) / (t + 1), the equal-weight mean (StochasticWeightAverage). The first update
copies the model (t = 0). BatchNorm buffers are copied from the model at every update, so the teacher's
running statistics follow the student (mmengine's update_buffers=False does the same; with update_buffers=True
it would average them and leave the integer num_batches_tracked behind).
"""

from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimkit.tasks.incremental.model import IncrementalClassifier

GAMMA = 100  # mmengine MomentumAnnealingEMA's default


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: T^2 * KL(softmax(teacher / T) || softmax(student / T)), mean over the batch; logits (N, K)."""
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    p_t = F.softmax(teacher_logits.detach() / t, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * t * t


def _set_head_size(model: IncrementalClassifier, n: int) -> None:
    """Shrink or grow a model's head to n outputs (values overwritten by a following load_state_dict)."""
    if model.num_classes != n:
        model.head = nn.Linear(model.feat_dim, n).to(model.head.weight.device, model.head.weight.dtype)


def _frozen_copy(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model).eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


class EMATeacher:
    """Loop hook keeping an averaged copy of the student (mode ema | anne | sto), updated after every step."""

    def __init__(self, student: IncrementalClassifier, mode: str, ratio: float) -> None:
        self.student, self.mode, self.ratio = student, mode, ratio
        self.model = _frozen_copy(student)
        self.steps = 0

    def momentum(self) -> float:
        """The weight of the new value at the current step (ema and anne)."""
        if self.mode == "anne":
            return max(self.ratio, GAMMA / (GAMMA + self.steps))
        return self.ratio

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One averaging step from `model`'s parameters; buffers (BatchNorm statistics) copied."""
        src = dict(model.named_parameters())
        for name, avg in self.model.named_parameters():
            p = src[name].detach()
            if self.steps == 0:
                avg.copy_(p)
            elif self.mode == "sto":
                avg.add_(p - avg, alpha=1.0 / (self.steps + 1))
            else:
                avg.lerp_(p, self.momentum())
        for b_avg, b_src in zip(self.model.buffers(), model.buffers(), strict=True):
            b_avg.copy_(b_src)
        self.steps += 1

    def on_step_end(self, trainer) -> None:
        """Average after every optimiser step."""
        self.update(self.student)

    @torch.no_grad()
    def begin_task(self) -> None:
        """Grow the teacher's head to the student's; the new rows start as the student's."""
        old = self.model.num_classes
        self.model.expand(self.student.num_classes)
        self.model.head.weight[old:] = self.student.head.weight[old:]
        self.model.head.bias[old:] = self.student.head.bias[old:]
        self.model.head.requires_grad_(False)

    def state_dict(self) -> dict:
        """Averaged weights and the step counter (ride in every checkpoint)."""
        return {"model": self.model.state_dict(), "steps": self.steps, "num_classes": self.model.num_classes}

    def load_state_dict(self, sd: dict, trainer=None) -> None:
        """Inverse of state_dict."""
        _set_head_size(self.model, int(sd["num_classes"]))
        self.model.load_state_dict(sd["model"])
        self.model.requires_grad_(False)
        self.steps = int(sd["steps"])


class PreviousModel:
    """Loop hook holding the frozen model of the end of the previous task (None during the first task)."""

    def __init__(self, student: IncrementalClassifier) -> None:
        self.student = student
        self.model: Optional[IncrementalClassifier] = None

    def begin_task(self) -> None:
        """Swap and freeze: the student as it ends a task becomes the reference of the next."""
        self.model = _frozen_copy(self.student)

    def state_dict(self) -> dict:
        """The frozen weights (None in the first task)."""
        if self.model is None:
            return {"model": None}
        return {"model": self.model.state_dict(), "num_classes": self.model.num_classes}

    def load_state_dict(self, sd: dict, trainer=None) -> None:
        """Inverse of state_dict."""
        if sd.get("model") is None:
            self.model = None
            return
        self.model = _frozen_copy(self.student)
        _set_head_size(self.model, int(sd["num_classes"]))
        self.model.load_state_dict(sd["model"])
        self.model.requires_grad_(False)


class ReservoirBuffer:
    """Reservoir sampling (Vitter's algorithm R, as Mammoth's ER): every example seen so far has the same
    chance, size / seen, of being in the buffer. Its own generator, so a resume draws the same numbers."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seen = 0
        self.examples: Optional[torch.Tensor] = None
        self.labels: Optional[torch.Tensor] = None
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return min(self.seen, self.size)

    @torch.no_grad()
    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Offer each example (x (N, ...), y (N,)) to the reservoir."""
        if self.examples is None:
            self.examples = torch.zeros((self.size, *x.shape[1:]), dtype=x.dtype)
            self.labels = torch.full((self.size,), -1, dtype=torch.long)
        for xi, yi in zip(x.detach().cpu(), y.detach().cpu(), strict=True):
            if self.seen < self.size:
                slot = self.seen
            else:
                slot = int(torch.randint(0, self.seen + 1, (1,), generator=self.gen))
            if slot < self.size:
                self.examples[slot], self.labels[slot] = xi, yi
            self.seen += 1

    def sample(self, n: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """n stored examples without replacement (fewer when the buffer holds fewer); None when empty."""
        filled = len(self)
        if filled == 0:
            return None
        idx = torch.randperm(filled, generator=self.gen)[:min(n, filled)]
        return self.examples[idx], self.labels[idx]

    def state_dict(self) -> dict:
        """Contents, count and generator state."""
        return {"seen": self.seen, "examples": self.examples, "labels": self.labels, "gen": self.gen.get_state()}

    def load_state_dict(self, sd: dict, trainer=None) -> None:
        """Inverse of state_dict."""
        self.seen, self.examples, self.labels = int(sd["seen"]), sd["examples"], sd["labels"]
        self.gen.set_state(sd["gen"])


def reference_logits(ref: nn.Module, imgs: torch.Tensor, feats: torch.Tensor, cls_only: bool) -> torch.Tensor:
    """Target logits (N, K_ref): the reference on the images, or with cls_only its head on the student's features."""
    with torch.no_grad():
        ref.eval()
        return ref.head(feats.detach()) if cls_only else ref(imgs)


def masked_distillation(net: IncrementalClassifier, feats: torch.Tensor, target: torch.Tensor, inv_mode: str,
                        temperature: float, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KD between the masked-feature logits and the target (N, K), with the detached inverse-mask logits added
    to the prediction (v1) or subtracted from the target (v2)."""
    k = target.shape[1]
    masked, inverse, _ = net.masker(feats, noise)
    pred = net.head(masked)[:, :k]
    inv = net.head(inverse).detach()[:, :k]
    if inv_mode == "v1":
        pred = pred + inv
    else:
        target = target - inv
    return kd_loss(pred, target, temperature)


def make_step(net: IncrementalClassifier, methods: frozenset[str], reference: Callable[[], Optional[nn.Module]],
              buffer: Optional[ReservoirBuffer], cfg) -> Callable:
    """step_fn for the engine: CE over the seen classes (+ replay) (+ kd) (+ mask); logs each term."""
    i = cfg.incremental
    replay_n = cfg.optimization.batch_size

    def step(model, batch):
        x, y = batch["images"], batch["labels"]
        if buffer is not None:
            drawn = buffer.sample(replay_n)  # drawn before the current batch goes in (Mammoth's order)
            buffer.add(x, y)
            if drawn is not None:
                x, y = torch.cat([x, drawn[0].to(x.device)]), torch.cat([y, drawn[1].to(y.device)])
        logits, feats = model(x, return_features=True)
        ce = F.cross_entropy(logits, y)
        loss, logs = ce, {"ce": ce.item()}
        ref = reference()
        if ref is not None and methods & {"kd", "mask"}:
            target = reference_logits(ref, x, feats, i.cls_only)
            if "kd" in methods:
                kd = kd_loss(logits[:, :target.shape[1]], target, i.temperature)
                loss, logs["kd"] = loss + i.kd_weight * kd, kd.item()
            if "mask" in methods:
                mk = masked_distillation(net, feats, target, i.inv_mode, i.temperature)
                loss, logs["mask"] = loss + i.mask_weight * mk, mk.item()
        return loss, logs

    return step
