"""WebDataset shards: written from folders, read back identically, DDP coverage, bitwise resume, bad input."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_MODEL, write_images
from mimkit.cli import main
from mimkit.data.sources import open_dataset
from mimkit.data.datasets import collate_batch
from mimkit.data.transforms import eval_transform
from mimkit.data.shards import has_shard_split, open_shards
from mimkit.data.packing import write_shards
from mimkit.errors import DataError


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    write_images(src / "train", 12, classes=3)
    write_images(src / "val", 6, size=36, seed=1, classes=3)
    return src


def test_written_shards_read_back_the_same_samples_and_labels(tmp_path: Path, labelled: Path, capsys) -> None:
    out = tmp_path / "shards"
    assert main(["shards", str(labelled), str(out), "--shard_size", "5"]) == 0
    printed = capsys.readouterr().out
    assert "train: 12 images in 3 shard(s)" in printed and "val: 6 images in 2 shard(s)" in printed
    assert f"--data_path '{out}/train-{{000000..000002}}.tar'" in printed
    index = json.loads((out / "train.index.json").read_text())
    assert index["count"] == 12 and [s["count"] for s in index["shards"]] == [5, 5, 2]
    assert index["classes"] == ["class0", "class1", "class2"]
    for split, spec in (("train", f"{out}/train-{{000000..000002}}.tar"), ("val", str(out))):
        folder = open_dataset(labelled, split, None)
        shards = open_dataset(spec, split, None)
        assert len(shards) == len(folder) and shards.classes == folder.classes
        # keys are the positions in the folder's sorted listing; the shard order is shuffled
        index = json.loads((out / f"{split}.index.json").read_text())
        keys = [int(m[0]) for s in index["shards"] for m in s["members"]]
        assert sorted(keys) == list(range(len(folder))) and keys != sorted(keys)
        for i, k in enumerate(keys):
            path, label = folder.samples[k]
            assert shards.read_bytes(i) == (Path(path).read_bytes(), label)
            img, lab = shards[i]
            assert lab == label and img.tobytes() == folder[k][0].tobytes()
    assert has_shard_split(out, "val") and has_shard_split(f"{out}/train-{{000000..000002}}.tar", "val")
    assert not has_shard_split(out, "test")
    # without the index the tar headers are scanned: the same view
    (out / "train.index.json").unlink()
    scanned = open_dataset(f"{out}/train-{{000000..000002}}.tar", "train", None)
    assert np.array_equal(scanned.index, open_shards(out, "train").index)
    assert scanned.classes == ["0", "1", "2"]  # class names live in the index; without it, the indices


def test_flat_folder_gives_unlabelled_shards_and_foreign_shards_read(tmp_path: Path) -> None:
    write_images(tmp_path / "flat", 4)
    write_shards(str(tmp_path / "flat"), tmp_path / "s")
    ds = open_dataset(tmp_path / "s" / "train-000000.tar", "train", None)
    assert len(ds) == 4 and ds.classes == [] and ds.targets.tolist() == [0] * 4
    # an image folder with a stray .tar in it is still an image folder
    (tmp_path / "flat" / "backup.tar").write_bytes(b"")
    assert len(open_dataset(tmp_path / "flat", "train", None)) == 4
    # shards another tool wrote: sub-folder keys, .jpeg / .png, extra members, a .cls, no index
    foreign = tmp_path / "foreign.tar"
    with tarfile.open(foreign, "w") as tf:
        for i, ext in enumerate(("jpeg", "png")):
            buf = io.BytesIO()
            Image.new("RGB", (20 + i, 10), (i * 90, 20, 30)).save(buf, format="PNG" if ext == "png" else "JPEG")
            for name, data in ((f"a/b/s{i}.{ext}", buf.getvalue()), (f"a/b/s{i}.cls", str(i).encode()),
                               (f"a/b/s{i}.json", b"{}")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    ds = open_dataset(foreign, "train", None)
    assert len(ds) == 2 and ds.targets.tolist() == [0, 1] and [ds[i][0].size for i in range(2)] == [(20, 10), (21, 10)]


def test_bad_shard_inputs_are_one_clear_line(tmp_path: Path, capsys) -> None:
    with pytest.raises(DataError, match="no shard matches"):
        open_dataset(str(tmp_path / "nothing-{000000..000003}.tar"), "train", None)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x-000000.tar").write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(DataError, match="is not a readable tar file"):
        open_dataset(str(tmp_path / "bad" / "x-000000.tar"), "train", None)
    with tarfile.open(tmp_path / "text.tar", "w") as tf:
        info = tarfile.TarInfo("a.txt")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(DataError, match="no images in the shards"):
        open_dataset(str(tmp_path / "text.tar"), "train", None)
    write_images(tmp_path / "flat", 2)
    write_shards(str(tmp_path / "flat"), tmp_path / "s")
    with pytest.raises(DataError, match="needs .cls labels"):
        open_dataset(str(tmp_path / "s"), "train", None, require_labels=True)
    with pytest.raises(DataError, match="already holds shards"):
        write_shards(str(tmp_path / "flat"), tmp_path / "s")
    # through the CLI: exit 2, one line, no traceback
    assert main(["pretrain", "--data_path", str(tmp_path / "nothing-{000000..000003}.tar"),
                 "--output_dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no shard matches" in err[0] and "Traceback" not in err[0]


def _corrupt_member(tar: Path, member_offset: int) -> None:
    os.chmod(tar, 0o644)
    with open(tar, "r+b") as f:
        f.seek(member_offset)
        f.write(b"\x00" * 64)


def _pretrain(out: Path, data: str, *extra: str) -> int:
    return main(["pretrain", *TINY_MODEL, "--data_path", data, "--output_dir", str(out), "--batch_size", "4",
                 "--num_workers", "0", "--blr", "1e-2", "--warmup_epochs", "1", "--print_freq", "1", "--epochs", "2",
                 *extra])


@pytest.mark.slow
def test_corrupt_member_is_skipped_and_counted(tmp_path: Path) -> None:
    write_images(tmp_path / "imgs", 8)
    write_shards(str(tmp_path / "imgs"), tmp_path / "s", shard_size=4)
    ds = open_shards(tmp_path / "s", "train", eval_transform(32))
    shard, offset, _, _ = ds.index[5].tolist()
    _corrupt_member(Path(ds.paths[shard]), offset)
    assert ds[5] is None and ds[4] is not None
    batch = collate_batch([ds[i] for i in range(4, 8)])
    assert batch["skipped"] == 1 and batch["images"].shape[0] == 3
    assert _pretrain(tmp_path / "run", str(tmp_path / "s")) == 0
    ckpt = torch.load(tmp_path / "run/checkpoints/final.pt", weights_only=True)
    assert ckpt["counters"]["skipped_images"] == 2  # the one bad member, once per epoch
    assert "skipped images 1 this epoch, 2 in all" in (tmp_path / "run/log.txt").read_text()


@pytest.mark.slow
def test_mid_epoch_resume_on_shards_is_bitwise(tmp_path: Path) -> None:
    write_images(tmp_path / "imgs", 16)
    write_shards(str(tmp_path / "imgs"), tmp_path / "s", shard_size=5)
    data = f"{tmp_path}/s/train-{{000000..000003}}.tar"
    assert _pretrain(tmp_path / "straight", data, "--num_workers", "2") == 0
    assert "16 training images" in (tmp_path / "straight/log.txt").read_text()
    split = tmp_path / "split"
    assert _pretrain(split, data, "--num_workers", "2", "--max_steps", "6", "--save_freq_steps", "2") == 0
    assert _pretrain(split, data, "--num_workers", "2", "--resume", str(split / "checkpoints/step-6")) == 0
    a = torch.load(tmp_path / "straight/checkpoints/final.pt", weights_only=True)["model"]
    b = torch.load(split / "checkpoints/final.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "step-6 at epoch 1, batch 2, step 6" in (split / "log.txt").read_text()


@pytest.mark.slow
def test_two_rank_gloo_reads_each_shard_sample_once_per_epoch(tmp_path: Path) -> None:
    write_images(tmp_path / "imgs", 13, classes=2)  # odd: one sample sits each epoch out, none is repeated
    write_shards(str(tmp_path / "imgs"), tmp_path / "s", shard_size=5)
    data = f"{tmp_path}/s/train-{{000000..000002}}.tar"
    dump = tmp_path / "dump"
    dump.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).with_name("shards_ddp_worker.py")), str(dump), data, "2", *TINY_MODEL,
           "--epochs", "1", "--batch_size", "2", "--num_workers", "0", "--device", "cpu",
           "--output_dir", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                                               os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = [json.loads((dump / f"seen{k}.json").read_text()) for k in range(2)]
    shards = open_dataset(data, "train", None)
    everything = {hashlib.sha1(shards[i][0].tobytes()).digest()[:8].hex() for i in range(13)}
    assert len(everything) == 13
    for epoch in ("0", "1"):
        a, b = seen[0][epoch], seen[1][epoch]
        assert len(a) == len(b) == 6 and len(set(a)) == len(set(b)) == 6  # no repeats on a rank
        assert not set(a) & set(b) and set(a) | set(b) < everything  # none on both ranks; 12 of the 13
    assert seen[0]["0"] != seen[0]["1"]  # reshuffled each epoch
    w0 = torch.load(dump / "rank0.pt", weights_only=True)
    w1 = torch.load(dump / "rank1.pt", weights_only=True)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert "13 training images" in (tmp_path / "run/log.txt").read_text()


@pytest.mark.slow
def test_evaluation_commands_take_shards(tmp_path: Path, labelled: Path) -> None:
    write_shards(str(labelled), tmp_path / "s", shard_size=4)
    assert _pretrain(tmp_path / "run", str(tmp_path / "s"), "--max_steps", "1") == 0
    assert main(["knn", "--checkpoint", str(tmp_path / "run"), "--data_path", str(tmp_path / "s"), "--k", "3",
                 "--output_dir", str(tmp_path / "knn")]) == 0
    knn = json.loads((tmp_path / "knn/results.json").read_text())
    assert (knn["num_train"], knn["num_val"]) == (12, 6) and knn["classes"] == ["class0", "class1", "class2"]
    assert main(["rankme", "--checkpoint", str(tmp_path / "run"), "--split", "val", "--output_dir",
                 str(tmp_path / "rk"), "--data_path", f"{tmp_path}/s/train-{{000000..000002}}.tar"]) == 0
    rk = json.loads((tmp_path / "rk/results.json").read_text())
    assert rk["metrics"]["num_images"] == 6  # the val shards beside the pattern's train shards


@pytest.mark.slow
def test_continual_domain_from_shards_uses_their_val_split(tmp_path: Path, labelled: Path) -> None:
    write_shards(str(labelled), tmp_path / "s", shard_size=4)
    out = tmp_path / "cont"
    assert main(["continual", *TINY_MODEL, "--output_dir", str(out), "--batch_size", "4", "--num_workers", "0",
                 "--epochs", "1", "--warmup_epochs", "0", "logging.vis_freq_epochs=0", "logging.tensorboard=false",
                 "continual.knn_k=3", "--domains", str(tmp_path / "s")]) == 0
    log = (out / "log.txt").read_text()
    assert "evaluated on s (6 val)" in log  # the 6 images of val-*.tar, not the training shards
    knn = json.loads((out / "knn_acc.json").read_text())
    assert len(knn["matrix"]) == 1 and 0 <= knn["matrix"][0][0] <= 100  # labelled via .cls: k-NN ran (percent)


def test_a_glob_keeps_val_shards_out_of_training_and_val_shards_have_no_val_split(
        tmp_path: Path, labelled: Path, caplog) -> None:
    out = tmp_path / "shards"
    write_shards(str(labelled), out, shard_size=5)
    with caplog.at_level("WARNING"):
        train = open_dataset(f"{out}/*.tar", "train", None)
    assert len(train) == 12 and "leaving out 2 val-/test-*.tar shard(s)" in caplog.text
    assert all(Path(p).name.startswith("train-") for p in train.paths)
    assert len(open_dataset(f"{out}/*.tar", "val", None)) == 6
    # val shards alone may be a training set, but then they have no separate val split
    assert len(open_dataset(f"{out}/val-*.tar", "train", None)) == 6
    with pytest.raises(DataError, match="names val shards themselves"):
        open_dataset(f"{out}/val-*.tar", "val", None)
    assert not has_shard_split(f"{out}/val-*.tar", "val") and has_shard_split(f"{out}/train-*.tar", "val")


def test_packing_skips_undecodable_images_and_names_them(tmp_path: Path, capsys, caplog) -> None:
    write_images(tmp_path / "flat", 3)
    (tmp_path / "flat" / "broken.jpg").write_bytes(b"not an image at all")
    with caplog.at_level("WARNING"):
        assert main(["shards", str(tmp_path / "flat"), str(tmp_path / "s")]) == 0
    printed = capsys.readouterr().out
    assert "train: 3 images in 1 shard(s), 1 undecodable image(s) skipped" in printed
    assert "for train and val" not in printed  # a flat folder has no val split, so no val shards
    assert caplog.text.count("broken.jpg") == 1 and "not packed" in caplog.text
    assert json.loads((tmp_path / "s/train.index.json").read_text())["count"] == 3
    assert len(open_dataset(tmp_path / "s", "train", None)) == 3


def test_shards_command_mistakes_are_one_line(tmp_path: Path, capsys) -> None:
    write_images(tmp_path / "flat", 2)
    (tmp_path / "afile").write_text("x")
    write_shards(str(tmp_path / "flat"), tmp_path / "s")
    cases = ((["shards", str(tmp_path / "flat"), str(tmp_path / "afile")], "OUT_DIR"),
             (["shards", str(tmp_path / "flat"), str(tmp_path / "s")], "choose an empty OUT_DIR"),
             (["stats", "--data_path", str(tmp_path / "x.tar.gz")], "compressed shards are not supported"))
    for argv, text in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and text in err[0] and "--out_dir" not in err[0]
    assert (tmp_path / "afile").read_text() == "x"


def test_an_unreadable_member_is_named_once(tmp_path: Path, caplog) -> None:
    from mimkit.data.device_augment import DeviceSamples

    write_images(tmp_path / "imgs", 4)
    write_shards(str(tmp_path / "imgs"), tmp_path / "s")
    ds = open_shards(tmp_path / "s", "train")
    key = json.loads((tmp_path / "s/train.index.json").read_text())["shards"][0]["members"][1][0]
    _corrupt_member(Path(ds.paths[0]), int(ds.index[1, 1]))
    with caplog.at_level("WARNING"):
        assert ds[1] is None and ds[1] is None and ds[0] is not None
        assert DeviceSamples(ds, jpeg_bytes=True)[1] is None
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "skipping unreadable" in r.getMessage()]
    assert len(warned) == 1 and f"train-000000.tar:{key}.jpg" in warned[0] and "_io.BytesIO" not in warned[0]
