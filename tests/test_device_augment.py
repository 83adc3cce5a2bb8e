"""data.augment_on=device: the worker path's crops, its images within Pillow's rounding, bitwise resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as F

from conftest import TINY_MODEL
from mimkit.data.sources import open_dataset
from mimkit.data.device_augment import DeviceAugment, DeviceSamples, collate_device, resize_weights
from mimkit.data.transforms import mean_std, pretrain_transform
from mimkit.engine.sampling import SeededSamples

SIZE = 32


def _photo_folder(folder: Path, n: int = 12, gray: bool = False) -> Path:
    """Smooth-ish images of varied sizes (photo-like, so JPEG decoders agree closely), as JPEG and PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        yy, xx = np.mgrid[0:h, 0:w]
        arr = np.stack([(127 + 100 * np.sin(xx / (5 + c + i) + yy / (7 + i))) for c in range(3)], -1)
        arr = np.clip(arr + rng.normal(0, 8, arr.shape), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr).convert("L") if gray else Image.fromarray(arr)
        img.save(folder / (f"img{i:02d}.png" if i % 3 == 2 else f"img{i:02d}.jpg"), quality=95)
    return folder


def _worker_and_device(folder: Path, seed: int, in_chans: int = 3, jpeg_bytes: bool = False):
    worker = SeededSamples(open_dataset(folder, "train", pretrain_transform(SIZE, in_chans=in_chans)), seed)
    device = SeededSamples(DeviceSamples(open_dataset(folder, "train", None), (0.2, 1.0), True, in_chans,
                                         jpeg_bytes=jpeg_bytes), seed)
    return worker, device


def test_crop_params_are_the_worker_paths(tmp_path: Path) -> None:
    """Per (seed, epoch, index), the device path's box + flip rebuild the worker path's output bitwise."""
    folder = _photo_folder(tmp_path / "imgs")
    base = open_dataset(folder, "train", None)
    mean, std = mean_std(3)
    flips = set()
    for seed in (0, 7):
        worker, device = _worker_and_device(folder, seed)
        for epoch in (0, 3):
            for index in range(len(base)):
                (src, crop), label = device[(epoch, index)]
                top, left, h, w, flip = crop.tolist()
                flips.add(flip)
                img = base[index][0]
                assert 0 <= top and top + h <= img.height and 0 <= left and left + w <= img.width
                # the worker crops before resizing: the device path's source is exactly that box
                box = np.array(img)[top:top + h, left:left + w]
                assert torch.equal(src, torch.from_numpy(box).permute(2, 0, 1))
                rebuilt = F.resized_crop(img, top, left, h, w, [SIZE, SIZE], F.InterpolationMode.BICUBIC)
                rebuilt = F.normalize(F.to_tensor(F.hflip(rebuilt) if flip else rebuilt), mean, std)
                assert torch.equal(rebuilt, worker[(epoch, index)][0]), (seed, epoch, index)
    assert flips == {0, 1}


@pytest.mark.parametrize("in_chans", [3, 1])
def test_device_images_match_worker_images(tmp_path: Path, in_chans: int) -> None:
    folder = _photo_folder(tmp_path / "imgs", gray=in_chans == 1)
    worker, device = _worker_and_device(folder, seed=3, in_chans=in_chans)
    keys = [(1, i) for i in range(len(worker))]
    batch = collate_device([device[k] for k in keys])
    out = DeviceAugment((SIZE, SIZE), *mean_std(in_chans))(batch)["images"]
    expected = torch.stack([worker[k][0] for k in keys])
    assert out.shape == expected.shape == (len(keys), in_chans, SIZE, SIZE)
    # resized in chunks of similar-size crops, each padded to its own largest: the same images, in batch order
    chunked = DeviceAugment((SIZE, SIZE), *mean_std(in_chans), chunk=5)(batch)["images"]
    torch.testing.assert_close(chunked, out, rtol=0, atol=1e-4)
    std = torch.tensor(mean_std(in_chans)[1]).view(1, -1, 1, 1)
    diff = ((out - expected) * std * 255).abs()  # in 8-bit levels
    # Pillow rounds to 8 bits after each pass (0.5 level, then carried through the bicubic taps); we keep float
    assert diff.max() <= 1.25
    assert diff.mean() < 0.35


def test_resize_weights_match_pillow_up_and_down() -> None:
    rng = np.random.default_rng(1)
    for in_w, crop, out in ((50, (3, 40), 16), (50, (10, 9), 16), (64, (0, 64), 64)):
        row = rng.integers(0, 256, (1, in_w)).astype(np.uint8)
        start, length = crop
        ref = np.asarray(Image.fromarray(row[:, start:start + length]).resize((out, 1), Image.BICUBIC), dtype=float)
        w = resize_weights(torch.tensor([start]), torch.tensor([length]), in_w, out)[0]
        ours = (w.double() @ torch.from_numpy(row[0].astype(float))).clamp(0, 255).numpy()
        assert np.abs(ours - ref[0]).max() <= 0.51, crop  # Pillow rounds to the nearest level
        assert torch.allclose(w.sum(1), torch.ones(out))


def test_jpeg_bytes_decoded_by_torchvision_match(tmp_path: Path) -> None:
    """The CUDA route (bytes to the device, batched decode_jpeg) run on CPU: same crops, near-identical images."""
    folder = _photo_folder(tmp_path / "imgs")
    worker, device = _worker_and_device(folder, seed=5, jpeg_bytes=True)
    keys = [(0, i) for i in range(len(worker))]
    items = [device[k] for k in keys]
    # JPEG files travel as bytes (1-D), the PNG ones as cropped pixels
    dims = [item[0][0].dim() for item in items]
    assert dims.count(1) == 8 and dims.count(3) == 4
    _, pixels = _worker_and_device(folder, seed=5)
    for k, item in zip(keys, items):
        assert torch.equal(item[0][1], pixels[k][0][1])  # the same boxes either way
    batch = collate_device(items)
    assert batch["pixels"] is None and len(batch["sources"]) == len(keys)
    out = DeviceAugment((SIZE, SIZE), *mean_std(3))(batch)["images"]
    expected = torch.stack([worker[k][0] for k in keys])
    diff = ((out - expected) * torch.tensor(mean_std(3)[1]).view(1, -1, 1, 1) * 255).abs()
    # on CPU both decoders are libjpeg-turbo: only the resampling's rounding differs (nvJPEG may differ slightly)
    assert diff.max() <= 1.25 and diff.mean() < 0.35


def test_shards_hand_jpeg_bytes_to_the_device_path(tmp_path: Path) -> None:
    """Over WebDataset shards the device path reads members' bytes: the same boxes and images as the folder."""
    import json

    from mimkit.data.packing import write_shards

    folder = _photo_folder(tmp_path / "imgs")
    write_shards(str(folder), tmp_path / "s", shard_size=5)
    keys = [int(m[0]) for s in json.loads((tmp_path / "s/train.index.json").read_text())["shards"]
            for m in s["members"]]
    on_shards = DeviceSamples(open_dataset(tmp_path / "s", "train", None), jpeg_bytes=True)
    on_folder = DeviceSamples(open_dataset(folder, "train", None), jpeg_bytes=True)
    for i, k in enumerate(keys):
        torch.manual_seed(i)
        (a, box_a), _ = on_shards[i]
        torch.manual_seed(i)
        (b, box_b), _ = on_folder[k]
        assert torch.equal(a, b) and torch.equal(box_a, box_b)


def test_exif_rotated_jpeg_is_decoded_by_the_worker(tmp_path: Path) -> None:
    """read_image applies EXIF orientation; nvJPEG would not, so a rotated phone photo never travels as bytes."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    arr = np.zeros((40, 70, 3), dtype=np.uint8)
    arr[:, :35] = (200, 30, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(arr).save(folder / "phone.jpg", exif=exif, quality=95)
    Image.fromarray(arr).save(folder / "plain.jpg", quality=95)
    worker, device = _worker_and_device(folder, seed=0, jpeg_bytes=True)
    (rotated, box), _ = device[(0, 0)]
    (plain, _), _ = device[(0, 1)]
    assert rotated.dim() == 3 and plain.dim() == 1  # phone.jpg decoded (and turned) by the worker
    top, left, h, w, _ = box.tolist()
    assert top + h <= 70 and left + w <= 40  # the box lies in the turned 40 x 70 (W x H) image
    out = DeviceAugment((SIZE, SIZE), *mean_std(3))(collate_device([device[(0, 0)], device[(0, 1)]]))["images"]
    expected = torch.stack([worker[(0, 0)][0], worker[(0, 1)][0]])
    assert ((out - expected) * torch.tensor(mean_std(3)[1]).view(1, -1, 1, 1) * 255).abs().max() <= 1.25


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_route_nvjpeg_matches_the_worker_path(tmp_path: Path) -> None:
    """On a GPU: JPEG bytes decoded by nvJPEG in one batch, resized on the GPU, against the CPU worker path."""
    folder = _photo_folder(tmp_path / "imgs")
    worker, device = _worker_and_device(folder, seed=2, jpeg_bytes=True)
    keys = [(0, i) for i in range(len(worker))]
    batch = collate_device([device[k] for k in keys])
    batch = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in batch.items()}  # as the loop moves it
    out = DeviceAugment((SIZE, SIZE), *mean_std(3))(batch)["images"]
    assert out.is_cuda and out.shape == (len(keys), 3, SIZE, SIZE)
    expected = torch.stack([worker[k][0] for k in keys])
    diff = ((out.cpu() - expected) * torch.tensor(mean_std(3)[1]).view(1, -1, 1, 1) * 255).abs()
    assert diff.mean() < 2.0  # nvJPEG's IDCT / chroma upsampling differ slightly from libjpeg-turbo's


def test_undecodable_jpeg_is_dropped_with_its_label(tmp_path: Path) -> None:
    folder = _photo_folder(tmp_path / "imgs", n=3)
    _, device = _worker_and_device(folder, seed=0, jpeg_bytes=True)
    items = [device[(0, i)] for i in range(3)]
    (src, crop), _ = items[0]
    bad = src.clone()
    bad[200:] = 0  # header intact, entropy-coded data destroyed
    items[0] = ((bad[:260], crop), 9)
    aug = DeviceAugment((SIZE, SIZE), *mean_std(3))
    batch = collate_device(items + [None])
    assert batch["skipped"] == 1
    out = aug(batch)
    assert aug.decode_failed == 1
    assert out["images"].shape == (2, 3, SIZE, SIZE) and out["labels"].tolist() == [items[1][1], items[2][1]]


def _pretrain(out: Path, data: Path, *extra: str) -> int:
    from mimkit.cli import main

    return main(["pretrain", *TINY_MODEL, "--data_path", str(data), "--output_dir", str(out), "--batch_size", "4",
                 "--num_workers", "0", "--blr", "1e-2", "--warmup_epochs", "1", "--print_freq", "1", "--epochs", "2",
                 *extra])


@pytest.mark.slow
def test_pretrain_on_device_matches_workers_and_resumes_bitwise(tmp_path: Path) -> None:
    import json

    folder = _photo_folder(tmp_path / "imgs")
    straight = tmp_path / "straight"
    assert _pretrain(straight, folder, "--augment_on", "device") == 0
    assert "augmentation on cpu" in (straight / "log.txt").read_text()
    split = tmp_path / "split"
    assert _pretrain(split, folder, "--augment_on", "device", "--num_workers", "2", "--max_steps", "4",
                     "--save_freq_steps", "2") == 0
    assert _pretrain(split, folder, "--augment_on", "device", "--resume", str(split / "checkpoints/step-4")) == 0
    a = torch.load(straight / "checkpoints/final.pt", weights_only=True)["model"]
    b = torch.load(split / "checkpoints/final.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the worker path sees the same crops: its first loss agrees within the resampling's rounding
    workers = tmp_path / "workers"
    assert _pretrain(workers, folder, "--max_steps", "1") == 0

    def first_loss(run: Path) -> float:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return next(r["loss"] for r in map(json.loads, lines) if r["kind"] == "step")

    assert first_loss(workers) == pytest.approx(first_loss(straight), rel=1e-3)


def test_bad_augment_on_is_one_clear_error(tmp_path: Path, capsys) -> None:
    from mimkit.cli import main

    assert main(["pretrain", "--augment_on", "gpu", "--output_dir", str(tmp_path / "r")]) == 2
    assert "data.augment_on" in capsys.readouterr().err
