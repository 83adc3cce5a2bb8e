"""Class-incremental pieces (seed 004): EMA rules, KD, masked features, splits, metrics, replay, CIFAR, ResNet."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from mimkit.errors import ConfigError, DataError
from mimkit.tasks.incremental import config as IC
from mimkit.tasks.incremental import data as ID
from mimkit.tasks.incremental.methods import EMATeacher, PreviousModel, ReservoirBuffer, kd_loss, masked_distillation
from mimkit.tasks.incremental.model import FeatureMasker, IncrementalClassifier
from mimkit.metrics import forgetting as Fg
from mimkit.models.resnet import resnet18_cifar


def tiny_net(num_classes: int = 3) -> IncrementalClassifier:
    """A backbone with a BatchNorm (to test buffers) and 4-d features."""
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.BatchNorm1d(4))
    return IncrementalClassifier(backbone, 4, num_classes)


# ---------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("name,nf", [("resnet18", 64), ("slim_resnet18", 20)])
def test_cifar_resnet18_shapes_and_size(name, nf):
    from mimkit.models.resnet import BACKBONES

    assert BACKBONES[name] == nf
    net = resnet18_cifar(nf)
    assert net.feat_dim == 8 * nf
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 8 * nf)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)  # CIFAR stem, no max-pool
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    assert [net.layer1[0].conv1.out_channels, net.layer2[0].conv1.out_channels, net.layer3[0].conv1.out_channels,
            net.layer4[0].conv1.out_channels] == [nf, 2 * nf, 4 * nf, 8 * nf]
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in net.modules()) == 17  # 1 + 8 x 2
    if nf == 64:  # the well-known CIFAR ResNet-18 size (kuangliu / Mammoth) with a 10-class head: 11,173,962
        assert sum(p.numel() for p in net.parameters()) + 512 * 10 + 10 == 11_173_962


def test_expand_keeps_old_rows():
    net = tiny_net(2)
    w, b = net.head.weight.detach().clone(), net.head.bias.detach().clone()
    net.expand(5)
    assert net.num_classes == 5
    assert torch.equal(net.head.weight[:2], w) and torch.equal(net.head.bias[:2], b)


# ---------------------------------------------------------------------------------------------- EMA
def _set(net: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(value)


@pytest.mark.parametrize("mode", ["ema", "anne", "sto"])
def test_ema_rules_by_hand(mode):
    net = tiny_net()
    ema = EMATeacher(net, mode, ratio=0.1)
    values = [1.0, 3.0, 7.0, -2.0]
    expected = None
    for t, v in enumerate(values):
        _set(net, v)
        net.backbone[2].running_mean.fill_(10.0 * v)  # BN statistics of the student at this step
        ema.update(net)
        if t == 0:
            expected = v  # the first update copies the model (mmengine: steps == 0)
        elif mode == "ema":
            expected = 0.9 * expected + 0.1 * v  # m = ema_ratio weights the NEW value
        elif mode == "anne":
            m = max(0.1, 100 / (100 + t))
            expected = (1 - m) * expected + m * v
        else:
            expected = sum(values[: t + 1]) / (t + 1)  # equal-weight mean of every snapshot
        assert ema.steps == t + 1
        for p in ema.model.parameters():
            assert torch.allclose(p, torch.full_like(p, expected), atol=1e-6)
        assert torch.equal(ema.model.backbone[2].running_mean, net.backbone[2].running_mean)  # buffers follow
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_anne_momentum_schedule():
    ema = EMATeacher(tiny_net(), "anne", ratio=0.3)
    ema.steps = 1
    assert ema.momentum() == pytest.approx(100 / 101)
    ema.steps = 1000
    assert ema.momentum() == pytest.approx(0.3)  # floor at ema_ratio once gamma / (gamma + t) falls below it


def test_ema_state_roundtrip_and_head_growth():
    net = tiny_net(2)
    ema = EMATeacher(net, "ema", 0.5)
    ema.update(net)
    net.expand(4)
    ema.begin_task()
    assert ema.model.num_classes == 4
    assert torch.equal(ema.model.head.weight[2:], net.head.weight[2:])
    other = EMATeacher(tiny_net(2), "ema", 0.5)
    other.student.expand(4)
    other.load_state_dict(ema.state_dict())
    assert other.steps == 1
    for a, b in zip(other.model.state_dict().values(), ema.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_previous_model_is_frozen_snapshot():
    net = tiny_net(2)
    prev = PreviousModel(net)
    assert prev.state_dict() == {"model": None}
    prev.begin_task()
    _set(net, 5.0)
    assert not torch.equal(prev.model.head.weight, net.head.weight)
    assert not any(p.requires_grad for p in prev.model.parameters())


# ---------------------------------------------------------------------------------------------- losses
def test_kd_loss_hand_value():
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[0.2, 1.5, 2.5]])
    T = 2.0
    ps = np.exp(s.numpy()[0] / T) / np.exp(s.numpy()[0] / T).sum()
    pt = np.exp(t.numpy()[0] / T) / np.exp(t.numpy()[0] / T).sum()
    hand = T * T * float(np.sum(pt * (np.log(pt) - np.log(ps))))
    assert kd_loss(s, t, T).item() == pytest.approx(hand, rel=1e-5)
    assert kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("mode,learnable,size", [("s", True, 1), ("a", True, 7), ("sgf", False, 1),
                                                 ("agf", False, 7)])
def test_masked_features_shapes_and_gradients(mode, learnable, size):
    masker = FeatureMasker(16, 0.4, mode)
    assert masker.len_keep == int(16 * 0.6) and tuple(masker.token.shape) == (1, size)
    assert isinstance(masker.token, nn.Parameter) == learnable
    feats = torch.randn(3, 16, requires_grad=True)
    masked, inverse, mask = masker(feats)
    assert masked.shape == inverse.shape == mask.shape == (3, 16)
    assert torch.equal(mask.sum(1), torch.full((3,), 16.0 - masker.len_keep))
    kept = mask == 0
    assert torch.equal(masked[kept], feats[kept])  # kept channels unchanged
    assert torch.equal(inverse[kept], torch.zeros_like(inverse[kept]))  # inverse keeps only the masked ones
    assert torch.equal(inverse[~kept], feats[~kept])
    masked.sum().backward()
    assert torch.equal(feats.grad, 1 - mask)  # only kept channels get gradient through the masked path
    if learnable:
        assert masker.token.grad is not None and masker.token.grad.abs().sum() > 0
    else:
        assert not masker.token.requires_grad and torch.equal(masker.token, torch.zeros(1, size))


def test_mask_token_fills_masked_channels_in_order():
    masker = FeatureMasker(4, 0.5, "a")
    with torch.no_grad():
        masker.token.copy_(torch.tensor([[10.0, 20.0]]))
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.2]])  # keep channels 1 and 3 (smallest noise)
    masked, _, mask = masker(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), noise)
    assert mask.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    # MAE order: tokens follow the shuffled order (ids 2 then 0, by ascending noise)
    assert masked.tolist() == [[20.0, 2.0, 10.0, 4.0]]


@pytest.mark.parametrize("inv_mode", ["v1", "v2"])
def test_inverse_mask_v1_adds_to_output_v2_subtracts_from_target(inv_mode):
    torch.manual_seed(0)
    net = tiny_net(3)
    net.masker = FeatureMasker(4, 0.5, "s")
    feats = torch.randn(2, 4, requires_grad=True)
    target = torch.randn(2, 3)
    noise = torch.rand(2, 4)
    loss = masked_distillation(net, feats, target, inv_mode, 2.0, noise)
    masked, inverse, _ = net.masker(feats, noise)
    pred, inv = net.head(masked), net.head(inverse)
    hand = kd_loss(pred + inv, target, 2.0) if inv_mode == "v1" else kd_loss(pred, target - inv, 2.0)
    assert loss.item() == pytest.approx(hand.item(), rel=1e-6)
    loss.backward()
    assert net.masker.token.grad is not None  # the masked forward trains the token


# ---------------------------------------------------------------------------------------------- splits
def test_splits_disjoint_covering_and_seeded():
    order0 = ID.class_order(10, 0)
    assert sorted(order0) == list(range(10))
    assert ID.class_order(10, 0) == order0 and ID.class_order(10, 1) != order0
    split = ID.TaskSplit(order0, IC.task_sizes(10, 5, None, None))
    tasks = [split.classes(t) for t in range(5)]
    assert all(len(c) == 2 for c in tasks)
    flat = [c for cs in tasks for c in cs]
    assert sorted(flat) == list(range(10)) and len(set(flat)) == 10
    assert IC.task_sizes(100, None, 50, 10) == [50] + [10] * 5  # PyCIL B50-Inc10


def test_task_subsets_relabel_in_order():
    class Toy(torch.utils.data.Dataset):
        targets = [0, 1, 2, 3, 0, 1, 2, 3]
        classes = ["a", "b", "c", "d"]

        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.tensor([float(i)]), self.targets[i]

    split = ID.TaskSplit([2, 0, 3, 1], [2, 2])
    subsets = ID.task_subsets(Toy(), split)
    assert [len(s) for s in subsets] == [4, 4]
    assert sorted({s[1] for s in subsets[0]}) == [0, 1]  # classes 2, 0 -> labels 0, 1
    assert {int(s[0].item()): s[1] for s in subsets[1]} == {1: 3, 3: 2, 5: 3, 7: 2}


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_on_hand_matrix():
    nan = math.nan
    R = [[90.0, nan, nan], [60.0, 80.0, nan], [50.0, 70.0, 95.0]]
    assert Fg.seen_averages(R) == pytest.approx([90.0, 70.0, (50 + 70 + 95) / 3])
    assert Fg.average_incremental_accuracy(R) == pytest.approx((90 + 70 + 215 / 3) / 3)
    f = Fg.forgetting(R)
    assert f[:2] == pytest.approx([40.0, 10.0]) and f[2] is None  # max over earlier rows minus final
    assert Fg.average_forgetting(R) == pytest.approx(25.0)  # (max(90,60)-50 + 80-70) / 2
    assert Fg.backward_transfer(R) == pytest.approx(((50 - 90) + (70 - 80)) / 2)


def test_report_metrics_and_table():
    from mimkit.tasks.incremental import report as R

    rows = [{"acc": [90.0], "acc_seen": 90.0, "rankme": 5.0, "classes": [1]},
            {"acc": [40.0, 80.0], "acc_seen": 60.0, "rankme": 4.0, "classes": [0]}]
    m = R.metrics(rows, 2)
    assert m["final_average_accuracy"] == pytest.approx(60.0)
    assert m["average_incremental_accuracy"] == pytest.approx(75.0)
    assert m["forgetting"] == pytest.approx(50.0) and m["bwt"] == pytest.approx(-50.0)
    table = R.format_table(rows, 2, [1, 1])
    assert "40.00" in table and "80.00" in table and "forgetting 50.00" in table


def test_picture_written(tmp_path):
    from PIL import Image

    from mimkit.tasks.incremental import report as R

    p = R.picture(tmp_path / "x.png", np.array([[90.0, np.nan], [10.0, 80.0]]), [5.0, 3.0])
    img = np.asarray(Image.open(p).convert("RGB"))
    assert img.shape[0] > 100 and img.shape[1] > 300
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20  # a heatmap, a colour bar and a curve were drawn


@pytest.mark.parametrize("shape", [(1, 2), (2, 2), (5, 5), (10, 10), (20, 20)])
def test_picture_parts_do_not_overlap(shape):
    from PIL import Image, ImageDraw, ImageFont

    from mimkit.tasks.incremental import report as R

    font, probe = ImageFont.load_default(), ImageDraw.Draw(Image.new("RGB", (1, 1)))
    L = R.layout(*shape, lambda t: int(probe.textlength(t, font=font)))
    boxes = list(L["boxes"].items())
    for a, (na, ba) in enumerate(boxes):
        assert ba[2] <= L["size"][0] and ba[3] <= L["size"][1], na  # inside the picture
        for nb, bb in boxes[a + 1:]:
            apart = ba[2] <= bb[0] or bb[2] <= ba[0] or ba[3] <= bb[1] or bb[3] <= ba[1]
            assert apart, (na, nb, ba, bb)


def test_rankme_axis_ticks_are_round_and_inside():
    from mimkit.tasks.incremental import report as R

    for lo, hi in [(12.3, 47.9), (0.0, 1.0), (3.2, 3.4), (95.0, 160.0)]:
        ticks = R.nice_ticks(lo, hi)
        assert 3 <= len(ticks) <= 11 and all(lo - 1e-9 <= t <= hi + 1e-9 for t in ticks)
        steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:])}
        assert len(steps) == 1 and float(f"{steps.pop():.1e}") in {m * 10.0 ** k for m in (1, 2, 5)
                                                                     for k in range(-3, 3)}


def test_csv_cells_are_rounded_and_empty_when_undefined(tmp_path):
    from mimkit.tasks.incremental import report as R

    rows = [{"task": 0, "classes": [3, 1], "acc": [0.1 + 0.2], "acc_seen": 0.1 + 0.2, "rankme": 12.345678},
            {"task": 1, "classes": [0, 2], "acc": [33.33333, 66.666666], "acc_seen": 50.0, "rankme": float("nan")}]
    R.write(tmp_path, rows, 3, {"config": {}})
    assert (tmp_path / "accuracy_matrix.csv").read_text().splitlines() == [
        "stage,task_0,task_1,task_2", "after_task_0,0.30,,", "after_task_1,33.33,66.67,"]
    assert (tmp_path / "per_task.csv").read_text().splitlines() == [
        "task,classes,acc_seen,rankme", "0,3 1,0.30,12.35", "1,0 2,50.00,"]


# ---------------------------------------------------------------------------------------------- replay
def test_reservoir_keeps_first_then_uniform():
    buf = ReservoirBuffer(5, seed=0)
    buf.add(torch.arange(3.0).view(3, 1), torch.arange(3))
    assert len(buf) == 3 and buf.labels[:3].tolist() == [0, 1, 2]
    # uniformity: after a stream of 50, every item is in the buffer with probability 5/50
    counts = np.zeros(50)
    for seed in range(400):
        b = ReservoirBuffer(5, seed=seed)
        for i in range(50):
            b.add(torch.tensor([[float(i)]]), torch.tensor([i]))
        assert b.seen == 50 and len(b) == 5 and len(set(b.labels.tolist())) == 5
        counts[b.labels.numpy()] += 1
    freq = counts / 400
    assert abs(freq.mean() - 0.1) < 1e-9
    assert freq[:25].mean() == pytest.approx(0.1, abs=0.03) and freq[25:].mean() == pytest.approx(0.1, abs=0.03)
    drawn = buf.sample(10)
    assert len(drawn[0]) == 3 and sorted(drawn[1].tolist()) == [0, 1, 2]  # without replacement, <= filled


def test_reservoir_state_roundtrip_draws_the_same():
    a = ReservoirBuffer(4, seed=3)
    a.add(torch.randn(10, 2), torch.arange(10))
    b = ReservoirBuffer(4, seed=99)
    b.load_state_dict({k: (v.clone() if torch.is_tensor(v) else v) for k, v in a.state_dict().items()})
    more_x, more_y = torch.randn(30, 2), torch.arange(10, 40)
    a.add(more_x, more_y)
    b.add(more_x, more_y)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.examples, b.examples)
    assert torch.equal(a.sample(3)[1], b.sample(3)[1])


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("key,value,fragment", [
    ("incremental.method", "kd,lwf", "unknown method 'lwf'"),
    ("incremental.ema_mode", "swa", "incremental.ema_mode"),
    ("incremental.mask_mode", "b", "incremental.mask_mode"),
    ("incremental.inv_mode", "v3", "incremental.inv_mode"),
    ("incremental.mask_ratio", 1.0, "in [0, 1)"),
    ("incremental.mask_ratio", -0.1, "in [0, 1)"),
])
def test_bad_config_values(key, value, fragment):
    from mimkit import config as C

    section, name = key.split(".")
    cfg = C.build_config(IC.IncrementalConfig, [("overrides", {section: {name: value}})])
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        IC.validate(cfg)


def test_more_tasks_than_classes():
    with pytest.raises(ConfigError, match="more than the 10 classes"):
        IC.task_sizes(10, 11, None, None)
    with pytest.raises(ConfigError, match="do not split"):
        IC.task_sizes(10, 3, None, None)


def test_uneven_init_increment_splits_are_errors_naming_the_numbers():
    assert IC.task_sizes(10, None, None, None) == [2] * 5  # default: 5 equal tasks
    assert IC.task_sizes(10, None, 2, 4) == [2, 4, 4] and IC.task_sizes(10, 3, 2, 4) == [2, 4, 4]
    assert IC.task_sizes(100, None, 50, 10) == [50] + [10] * 5 and IC.task_sizes(10, None, 5, None) == [5, 5]
    with pytest.raises(ConfigError, match=r"10 classes cannot split into tasks of increment 3 after 2 initial "
                                          r"\(8 classes left, not a multiple of 3\)"):
        IC.task_sizes(10, None, 2, 3)  # was silently [2, 3, 3, 2]
    with pytest.raises(ConfigError, match=r"10 classes cannot split into 4 tasks of increment 4 after 2 initial "
                                          r"\(2 \+ 3 x 4 = 14\)"):
        IC.task_sizes(10, 4, 2, 4)  # --tasks was silently ignored


@pytest.mark.parametrize("overrides,fragment", [
    ({"ema_mode": "ema"}, "--ema_mode ema has no effect with --method ce"),
    ({"ema_mode": "sto", "method": "er"}, "--ema_mode sto has no effect with --method er"),
    ({"cls_only": True}, "--cls_only has no effect with --method ce"),
    ({"cls_only": True, "method": "er"}, "--cls_only has no effect with --method er"),
])
def test_flags_without_effect_under_the_method_are_errors(overrides, fragment):
    from mimkit import config as C

    cfg = C.build_config(IC.IncrementalConfig, [("overrides", {"incremental": overrides})])
    with pytest.raises(ConfigError, match=fragment):
        IC.validate(cfg)
    for fine in ({"method": "kd"}, {"method": "mask"}, {"method": "er,kd"}):  # the same flags where they act
        IC.validate(C.build_config(IC.IncrementalConfig, [("overrides", {"incremental": {**overrides, **fine}})]))
    if "ema_mode" in overrides:  # evaluating the EMA itself is an effect too
        IC.validate(C.build_config(IC.IncrementalConfig,
                                   [("overrides", {"incremental": {**overrides, "eval_teacher": True}})]))


@pytest.mark.parametrize("overrides,fragment,fine", [
    ({"method": "kd", "mask_ratio": 0.7}, "--mask_ratio 0.7 has no effect with --method kd: only --method mask",
     "mask"),
    ({"method": "kd", "mask_mode": "a"}, "--mask_mode a has no effect with --method kd: only --method mask", "mask"),
    ({"method": "kd", "inv_mode": "v2"}, "--inv_mode v2 has no effect with --method kd", "kd,mask"),
    ({"buffer_size": 50}, "--buffer_size 50 has no effect with --method ce: only --method er", "er"),
    ({"temperature": 3.0}, "--temperature 3.0 has no effect with --method ce: only --method kd / mask", "mask"),
    ({"kd_weight": 2.0}, "--kd_weight 2.0 has no effect with --method ce: only --method kd", "kd,er"),
    ({"method": "mask", "ema_ratio": 0.5}, "--ema_ratio 0.5 has no effect without an EMA teacher", None),
])
def test_method_specific_flags_under_another_method_are_errors(overrides, fragment, fine):
    from mimkit import config as C

    cfg = C.build_config(IC.IncrementalConfig, [("overrides", {"incremental": overrides})])
    with pytest.raises(ConfigError, match=fragment) as e:
        IC.validate(cfg)
    assert "\n" not in str(e.value)
    where = {"method": fine} if fine else {"ema_mode": "ema"}  # the same value where it acts is fine
    IC.validate(C.build_config(IC.IncrementalConfig, [("overrides", {"incremental": {**overrides, **where}})]))


def test_parse_methods():
    assert IC.parse_methods("kd,er") == {"ce", "kd", "er"}
    assert IC.parse_methods("ce") == {"ce"}


# ---------------------------------------------------------------------------------------------- CIFAR
def write_fake_cifar(root: Path, kind: str = "cifar10", per_file: int = 20, classes: int = 10,
                     str_keys: bool = False) -> Path:
    """A tiny folder in the real python-version layout (pickled dicts with bytes keys, uint8 rows); str_keys
    writes str keys and str names, as a file re-pickled under Python 3 has."""
    rng = np.random.default_rng(0)
    sub, train, test, meta, names_key, label_key = ID.CIFAR_FILES[kind]
    key = (lambda k: k) if str_keys else (lambda k: k.encode())
    folder = root / sub
    folder.mkdir(parents=True)
    for f in [*train, *test]:
        d = {key("data"): rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
             key(label_key): [int(v) for v in np.arange(per_file) % classes], key("filenames"): ["x.png"] * per_file}
        (folder / f).write_bytes(pickle.dumps(d, protocol=2))
    (folder / meta).write_bytes(pickle.dumps({key(names_key): [key(f"c{i}") for i in range(classes)]},
                                             protocol=2))
    return root


@pytest.mark.parametrize("kind,classes,n_train", [("cifar10", 10, 100), ("cifar100", 100, 200)])
def test_cifar_python_layout(tmp_path, kind, classes, n_train):
    root = write_fake_cifar(tmp_path / "data", kind, per_file=20 if kind == "cifar10" else 200, classes=classes)
    tr_tf, va_tf = ID.transforms(32, 4, True)
    train, val, found = ID.open_data(str(root), "auto", tr_tf, va_tf)
    assert found == kind and len(train.classes) == classes and len(train) == n_train
    img, label = train[3]
    assert img.shape == (3, 32, 32) and label == 3
    raw = pickle.loads((root / ID.CIFAR_FILES[kind][0] / ID.CIFAR_FILES[kind][1][0]).read_bytes())[b"data"][3]
    assert np.array_equal(np.asarray(ID.open_cifar(root, kind, None, None)[0][3][0]),
                          raw.reshape(3, 32, 32).transpose(1, 2, 0))  # rows are channel-major, as the real files


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_str_keys_as_python3_repickled(tmp_path, kind):
    classes = 10 if kind == "cifar10" else 100
    root = write_fake_cifar(tmp_path / "data", kind, per_file=200, classes=classes, str_keys=True)
    train, val, found = ID.open_data(str(root), "auto", None, None)
    assert found == kind and train.classes[:2] == ["c0", "c1"] and len(val) == 200 and train[7][1] == 7


def test_cifar_file_missing_a_key_names_file_and_key(tmp_path):
    root = write_fake_cifar(tmp_path / "data", "cifar100", per_file=200, classes=100)
    meta = root / "cifar-100-python" / "meta"
    meta.write_bytes(pickle.dumps({b"coarse_label_names": [b"x"]}, protocol=2))
    with pytest.raises(DataError) as e:
        ID.open_data(str(root), "cifar100", None, None)
    msg = str(e.value)
    assert "\n" not in msg and str(meta) in msg and "'fine_label_names'" in msg


def test_cifar_missing_files_one_line(tmp_path):
    root = write_fake_cifar(tmp_path / "data")
    (root / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError) as e:
        ID.open_data(str(root), "cifar10", None, None)
    msg = str(e.value)
    assert "\n" not in msg and "cifar-10-batches-py" in msg
    assert "lacks test_batch;" in msg  # the missing file is named, the present ones are not listed as missing
    (root / "cifar-10-batches-py" / "data_batch_2").unlink()
    with pytest.raises(DataError, match="lacks data_batch_2, test_batch;"):
        ID.open_data(str(root), "cifar10", None, None)


@pytest.mark.parametrize("preset,tasks,model", [("incremental/digits.yaml", 5, "slim_resnet18"),
                                                ("incremental/cifar100_10tasks.yaml", 10, "resnet18"),
                                                ("incremental/cifar10_5tasks.yaml", 5, "resnet18")])
def test_presets_load_and_flags_win(preset, tasks, model):
    import argparse

    from mimkit.tasks.incremental import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args([preset, "incremental.kd_weight=2", "--method", "kd", "--epochs", "7"]))
    assert cfg.incremental.tasks == tasks and cfg.model.type == model
    assert cfg.schedule.epochs == 7 and cfg.incremental.kd_weight == 2.0  # flags and overrides beat the preset


# ---------------------------------------------------------------------------------------------- PreciseBN
def test_precise_bn_recomputes_population_statistics_without_moving_rng():
    from mimkit.data.datasets import collate_batch
    from mimkit.tasks.incremental.precise_bn import PreciseBN

    torch.manual_seed(0)
    data = [(torch.randn(2, 1, 1) * 3 + 5, 0) for _ in range(12)]
    net = nn.Sequential(nn.BatchNorm2d(2))
    net.eval()
    stored = torch.randn(4, 2, 1, 1) - 7  # a replay buffer's images come after the task's
    hook = PreciseBN(lambda: [net], data, collate_batch, epochs=2, batch_size=4, num_images=8, seed=1,
                     device=torch.device("cpu"), extra=lambda: stored)
    hook.on_epoch_end(None, 0)  # not the last epoch: running statistics untouched
    assert torch.equal(net[0].running_mean, torch.zeros(2)) and torch.equal(net[0].running_var, torch.ones(2))
    before = torch.random.get_rng_state()
    hook.on_epoch_end(None, 1)
    assert torch.equal(torch.random.get_rng_state(), before)  # training's random stream does not move
    batches = [torch.stack([x for x, _ in data[:4]]), torch.stack([x for x, _ in data[4:8]]), stored]
    # momentum None: the equal-weight mean over batches of the batch mean / unbiased variance (only 8 images used)
    mean = torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0)
    var = torch.stack([b.var((0, 2, 3), unbiased=True) for b in batches]).mean(0)
    assert torch.allclose(net[0].running_mean, mean, atol=1e-5) and torch.allclose(net[0].running_var, var, atol=1e-4)
    assert net[0].momentum == 0.1 and not net.training  # restored


def test_estimate_and_run_eta_cover_the_tasks_left(tmp_path, monkeypatch):
    from mimkit.engine import logging as L

    clock = iter(np.arange(0.0, 1000.0, 2.0))  # every perf_counter call advances 2 s
    monkeypatch.setattr(L.time, "perf_counter", lambda: float(next(clock)))
    run = L.RunLogger(tmp_path, tensorboard=False, print_freq=1)
    run.tty = False
    run.later_iters = 90  # the tasks after this one: 90 iterations
    run.start_run(10, "cpu")
    run.start_epoch(0, 10)
    for i in range(10):
        run.progress(i, {"loss": 1.0})
    eta = run.run_eta()
    run.close()
    log = (tmp_path / "log.txt").read_text()
    assert "estimated time of the whole run" in log and "(100 iterations at" in log
    assert eta is not None and eta >= 90 * 2.0  # this task's end is not the run's end: 90 iterations still to go


def test_resume_compares_effective_tasks_and_nf(tmp_path):
    from mimkit import config as C
    from mimkit.tasks.incremental import resume as RS

    def cfg(**inc):
        model = inc.pop("model", {"type": "slim_resnet18"})
        return C.to_container(C.build_config(IC.IncrementalConfig, [("overrides", {"incremental": inc,
                                                                                  "model": model})]))
    started = cfg()  # no --tasks, no --nf: 5 tasks, slim_resnet18's width 20
    assert RS.compare(started, cfg(tasks=5), tmp_path) == []
    assert RS.compare(started, cfg(model={"type": "slim_resnet18", "nf": 20}), tmp_path) == []
    with pytest.raises(ConfigError, match="incremental.tasks 5 -> 4"):
        RS.compare(started, cfg(tasks=4), tmp_path)
    with pytest.raises(ConfigError, match="model.nf 20 -> 8"):
        RS.compare(started, cfg(model={"type": "slim_resnet18", "nf": 8}), tmp_path)


def test_schedule_change_on_a_finished_run_says_nothing_to_train():
    from mimkit.tasks.incremental import resume as RS

    change = [{"key": "schedule.epochs", "old": 1, "new": 2}]
    assert "applies from task 3 on" in RS.describe_changes(change, 3, 5)
    done = RS.describe_changes(change, 5, 5)
    assert "the run is finished (all 5 tasks done): nothing to train" in done and "new --output_dir" in done
    assert "task 5" not in done


def test_empty_data_folder_hints_at_the_cifar_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as e:
        ID.open_data(str(tmp_path / "empty"), "auto", None, None)
    msg = str(e.value)
    assert "\n" not in msg and "class folders" in msg
    assert "cifar-100-python/" in msg and "cifar-10-batches-py/" in msg and "batches.meta" in msg
