"""Issue 10 part B (the closing new-user trial): presets for built-in data, start-up lines, estimates of every run,
image notes, CLI habits, the visualize grid."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from mimkit.cli import build_parser
from mimkit.engine import logging as L
from mimkit.tasks import continual as CT
from mimkit.tasks import pretrain as P


def _continual_cfg(*argv: str):
    return CT.config_from_args(build_parser().parse_args(["continual", *argv]))


def _pretrain_cfg(*argv: str):
    return P.config_from_args(build_parser().parse_args(["pretrain", *argv]))


# ---------------------------------------------------------------------------------------------- 1. built-in data
@pytest.mark.parametrize("argv", [("--domains", "photos", "textures"), ("--data_path", "photos")])
def test_continual_on_builtin_domains_takes_the_demo_recipe(argv) -> None:
    cfg = _continual_cfg(*argv)
    assert cfg.misc.preset == "continual/demo.yaml"
    assert cfg.model.type == "mae_vit_nano_patch8" and cfg.data.input_size == 64 and cfg.schedule.epochs == 3
    # the user's data replaces the preset's domain list
    assert list(cfg.continual.domains) == (["photos", "textures"] if argv[0] == "--domains" else [])


@pytest.mark.parametrize("argv", [("--domains", "photos", "--model", "mae_vit_base_patch16"),
                                  ("continual/basic.yaml", "--domains", "photos")])
def test_continual_model_or_config_file_replaces_the_builtin_preset(argv) -> None:
    cfg = _continual_cfg(*argv)
    assert cfg.misc.preset is None and cfg.model.type != "mae_vit_nano_patch8"


def test_an_existing_folder_named_like_a_builtin_set_gets_no_preset(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "photos").mkdir()
    monkeypatch.chdir(tmp_path)
    assert _continual_cfg("--domains", "photos").misc.preset is None


@pytest.mark.parametrize("data,preset", [("textures", "pretrain/demo.yaml"), ("digits", "pretrain/digits.yaml"),
                                         ("photos", "pretrain/photos.yaml")])
def test_pretrain_on_builtin_data_takes_a_cpu_preset(data: str, preset: str) -> None:
    cfg = _pretrain_cfg("--data_path", data)
    assert cfg.misc.preset == preset and cfg.data.data_path == data
    assert C_input(cfg) <= 64 and cfg.model.type != "mae_vit_large_patch16"
    named = _pretrain_cfg("--data_path", data, "--model", "mae_vit_base_patch16")
    assert named.misc.preset is None and named.model.type == "mae_vit_base_patch16" and C_input(named) == 224
    assert _pretrain_cfg("--data_path", "/not/builtin").misc.preset is None


def C_input(cfg) -> int:
    return int(cfg.data.input_size)


def test_continual_startup_lines_name_the_architecture_and_the_cpu_cost() -> None:
    cfg = _continual_cfg("--domains", "photos", "--model", "mae_vit_large_patch16", "--device", "cpu")
    with torch.device("meta"):
        model = P.build_model(cfg, "meta")
    lines = "\n".join(CT.startup_lines(cfg, model))
    assert "model mae_vit_large_patch16 (patch 16, 24 blocks x 1024-d" in lines and "224x224 px" in lines
    assert re.search(r"note: a 3\d\dM-parameter model on a CPU is slow; continual/demo.yaml fits a CPU", lines)
    demo = _continual_cfg("--domains", "photos", "--device", "cpu")
    with torch.device("meta"):
        small = P.build_model(demo, "meta")
    lines = "\n".join(CT.startup_lines(demo, small))
    assert "mae_vit_nano_patch8 (patch 8, 4 blocks x 96-d" in lines and "preset continual/demo.yaml" in lines
    assert "note:" not in lines


# ---------------------------------------------------------------------------------------------- 5. estimates
@pytest.mark.parametrize("iters", [1, 2, 4, 5])
def test_every_run_gets_an_estimate(tmp_path: Path, iters: int) -> None:
    run = L.RunLogger(tmp_path, tensorboard=False)
    run.tty = False
    run.start_run(iters, "cpu")
    run.start_epoch(0, iters)
    for i in range(iters):
        run.progress(i, {"loss": 1.0})
    run.close()
    log = (tmp_path / "log.txt").read_text()
    assert log.count("estimated time of the whole run: under a minute") == 1
    assert f"({iters} iteration{'s' if iters > 1 else ''} at" in log


def test_a_stage_estimate_speaks_for_the_stages_left(tmp_path: Path, monkeypatch) -> None:
    clock = iter(range(0, 100_000, 700))  # every perf_counter call advances 700 s
    monkeypatch.setattr(L.time, "perf_counter", lambda: float(next(clock)))
    run = L.RunLogger(tmp_path, tensorboard=False)
    run.tty, run.slow_hint = False, "continual/demo.yaml fits"
    run.also_estimate = (3, "stage(s) left")
    run.start_run(2, "cpu")
    run.start_epoch(0, 2)
    for i in range(2):
        run.progress(i, {"loss": 1.0})
    run.close()
    log = (tmp_path / "log.txt").read_text()
    one = re.search(r"estimated time of the whole run: (\d+) h (\d+) min", log)
    three = re.search(r"estimated time of 3 stage\(s\) left: (\d+) h (\d+) min", log)
    assert one and three and "that is hours on a CPU: continual/demo.yaml fits" in log
    minutes = [int(m.group(1)) * 60 + int(m.group(2)) for m in (one, three)]
    assert abs(minutes[1] - 3 * minutes[0]) <= 2


# ---------------------------------------------------------------------------------------------- 2, 3. image notes
def _alpha_files(folder: Path) -> dict[str, Path]:
    """One file per mode with transparency Pillow writes: RGBA, LA, palette with a transparent colour."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    rgba = rng.integers(0, 256, (40, 40, 4), dtype=np.uint8)
    out["RGBA"] = folder / "a_rgba.png"
    Image.fromarray(rgba, "RGBA").save(out["RGBA"])
    out["LA"] = folder / "b_la.png"
    Image.fromarray(rgba[..., :2].copy(), "LA").save(out["LA"])
    out["P"] = folder / "c_p.png"
    Image.fromarray(rgba[..., :3].copy()).quantize(8).save(out["P"], transparency=0)
    return out


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_noted_for_every_alpha_mode(tmp_path: Path, mode: str) -> None:
    from PIL import Image

    from mimkit.data.images import scan_images

    path = _alpha_files(tmp_path)[mode]
    with Image.open(path) as im:
        assert im.mode == mode
    notes = scan_images([path] * 3)
    assert len(notes) == 1 and notes[0].startswith("3 image(s) have transparency (first: ")
    assert str(path) in notes[0] and "composited on a white background" in notes[0]


@pytest.mark.slow
def test_pretrain_on_rgba_images_says_transparency_once(tmp_path: Path) -> None:
    from conftest import TINY_MODEL
    from PIL import Image
    import numpy as np

    from mimkit.cli import main

    data = tmp_path / "imgs"
    data.mkdir()
    for i in range(8):
        a = np.random.default_rng(i).integers(0, 256, (40, 40, 4), dtype=np.uint8)
        Image.fromarray(a, "RGBA").save(data / f"{i}.png")
    assert main(["pretrain", *TINY_MODEL, "--data_path", str(data), "--output_dir", str(tmp_path / "r"),
                 "--batch_size", "4", "--num_workers", "0", "--epochs", "1", "logging.tensorboard=false"]) == 0
    log = (tmp_path / "r" / "log.txt").read_text()
    assert log.count("have transparency") == 1 and "8 image(s) have transparency (first: " in log
    assert "estimated time of the whole run: under a minute (2 iterations" in log  # item 5: a 2-step run too


def _png_12bit(path: Path, top: int = 4095) -> Path:
    """A real 12-bit-in-16 PNG (what a 12-bit camera writes): uint16 values 0..top in a 16-bit grayscale file."""
    import numpy as np
    from PIL import Image

    a = np.linspace(0, top, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    Image.fromarray(a).save(path)
    return path


def test_12bit_data_in_16bit_png_uses_its_whole_range(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from mimkit.data.images import read_image, scan_images

    path = _png_12bit(tmp_path / "cam.png")
    with Image.open(path) as im:
        assert im.mode.startswith("I;16") and np.asarray(im).max() == 4095
    gray = np.asarray(read_image(path, "L")).astype(int)
    assert gray.max() == 255 and gray.min() == 0 and abs(gray.mean() - 127.5) < 1  # was max 16: nearly black
    raw = np.asarray(Image.open(path)).astype(float)
    assert np.abs(gray - raw * 255 / 4095).max() <= 0.5  # one factor, v * 255 / 4095, not a per-image stretch
    full = _png_12bit(tmp_path / "full.png", top=65535)
    assert np.asarray(read_image(full, "L")).max() == 255
    notes = scan_images([path, path, full])
    assert len(notes) == 1 and notes[0].startswith("2 16-bit image(s) use only 12 bits")
    assert "v * 255 / 4095" in notes[0] and "1 other 16-bit image(s) by v * 255 / 65535" in notes[0]


def test_dark_12bit_images_keep_their_relative_brightness(tmp_path: Path) -> None:
    import numpy as np

    from mimkit.data.images import read_image

    dark = np.asarray(read_image(_png_12bit(tmp_path / "dark.png", top=1000), "L")).max()
    assert dark == round(1000 * 255 / 4095)  # not stretched to 255: images of one set stay comparable


# ---------------------------------------------------------------------------------------------- 7. visualize grid
def _tiny_mae():
    from mimkit.models import create_model

    torch.manual_seed(0)
    return create_model("mae_vit_tiny_patch16", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                        decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def test_visualize_grid_labels_every_row_with_its_file_name() -> None:
    import numpy as np

    from mimkit.tasks.visualize import LINE_H, reconstruction_grid

    model, imgs, noise = _tiny_mae(), torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    plain = reconstruction_grid(model, imgs, 0.75, noise)
    labelled = reconstruction_grid(model, imgs, 0.75, noise, row_labels=["cat.png", "a_much_longer_name.tif"])
    band = LINE_H + 2
    assert labelled.shape[0] == plain.shape[0] + 2 * band  # one label band above each row
    header = plain.shape[0] - 2 * 128
    bands = [labelled[header + i * (band + 128): header + i * (band + 128) + band] for i in range(2)]
    for b in bands:
        assert (b < 128).any() and (b == 255).mean() > 0.5  # dark text on white
    assert not np.array_equal(bands[0], bands[1])  # each row its own name
    # the image rows themselves are unchanged below their bands
    assert np.array_equal(labelled[header + band: header + band + 128], plain[header: header + 128])


def test_visualize_title_wraps_to_fit_the_picture() -> None:
    from PIL import Image, ImageDraw

    from mimkit.tasks.visualize import _fit, _wrap, reconstruction_grid

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title = ("mimkit checkpoint /home/user/runs/pretrain/2026-11-29_08-55-12/checkpoints/final.pt: "
             "mae_vit_demo_patch8 (patch 8, 6 blocks x 192-d), 64x64 px, mask 0.75")
    lines = _wrap(draw, title, 200)
    assert len(lines) > 2 and all(draw.textlength(line) <= 200 for line in lines)
    assert "".join(lines).replace(" ", "") == title.replace(" ", "")  # nothing lost
    short = reconstruction_grid(_tiny_mae(), torch.randn(1, 3, 32, 32), 0.75, torch.rand(1, 16), title="x")
    long = reconstruction_grid(_tiny_mae(), torch.randn(1, 3, 32, 32), 0.75, torch.rand(1, 16), title=title)
    assert long.shape[1] == short.shape[1] and long.shape[0] > short.shape[0]  # taller header, same width
    cut = _fit(draw, "/very/long/folder/name/with/many/parts/photo_0001.png", 80)
    assert cut.startswith("...") and cut.endswith("0001.png") and draw.textlength(cut) <= 80


@pytest.mark.slow
def test_visualize_cli_names_rows_and_notes_transparency(tmp_path: Path, capsys) -> None:
    from conftest import TINY_MODEL, write_images
    from PIL import Image

    from mimkit.cli import main

    run = tmp_path / "run"
    data = tmp_path / "imgs"
    write_images(data, 4)
    assert main(["pretrain", *TINY_MODEL, "--data_path", str(data), "--output_dir", str(run), "--batch_size", "4",
                 "--num_workers", "0", "--epochs", "1", "--max_steps", "1", "logging.tensorboard=false"]) == 0
    files = _alpha_files(tmp_path / "alpha")
    out = tmp_path / "v.png"
    assert main(["visualize", str(run / "checkpoints/final.pt"), str(files["RGBA"]), str(files["P"]),
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("have transparency") == 1 and "2 image(s) have transparency" in printed
    with Image.open(out) as im:
        assert im.height > 2 * 128 + 2 * 16  # two rows, each under its label band


# ---------------------------------------------------------------------------------------------- 9. preset names
@pytest.mark.parametrize("preset", ["pretrain/digits.yaml", "pretrain/photos.yaml"])
def test_pays_presets_name_their_own_architecture(preset: str) -> None:
    from mimkit.models import create_model

    cfg = _pretrain_cfg(preset)
    assert cfg.model.type == "mae_vit_nano_patch4_dec64d2b" and dict(cfg.model.kwargs) == {}
    with torch.device("meta"):
        model = P.build_model(cfg, "meta")
        # the same architecture the preset built before under mae_vit_tiny_patch16 + model.kwargs (old runs load)
        old = create_model("mae_vit_tiny_patch16", img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3,
                           decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=2)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in old.state_dict().items()}
    assert model.patch_size == 4 and len(model.blocks) == 4 and model.embed_dim == 96
    assert len(model.decoder_blocks) == 2 and model.decoder_embed.out_features == 64
    # an explicit name builds exactly that architecture, whatever the preset beneath it
    named = _pretrain_cfg(preset, "--model", "mae_vit_tiny_patch16")
    with torch.device("meta"):
        tiny = P.build_model(named, "meta")
    assert tiny.patch_size == 16 and len(tiny.blocks) == 12 and tiny.embed_dim == 192


# ---------------------------------------------------------------------------------------------- 8. one batch
def test_too_few_images_for_the_cpu_preset_names_the_numbers_not_the_preset(tmp_path: Path, capsys) -> None:
    from conftest import write_images

    from mimkit.cli import main

    data = tmp_path / "imgs"
    write_images(data, 10)
    assert main(["pretrain", "pretrain/cpu_small.yaml", "--data_path", str(data), "--output_dir",
                 str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "the dataset has 10 image(s): fewer than one batch of 16 per process (1 process(es))" in err
    assert "use --batch_size 10 or smaller, or add at least 6 image(s)" in err
    assert "cpu_small.yaml" not in err and not (tmp_path / "r").exists()


def test_one_batch_check_with_several_processes() -> None:
    from mimkit.errors import DataError
    from mimkit.tasks.preflight import check_one_batch

    check_one_batch(32, 16, 2)  # exactly one batch per process: fine
    with pytest.raises(DataError, match=r"use --batch_size 7 or smaller, or add at least 34 image\(s\)"):
        check_one_batch(30, 16, 4)
    with pytest.raises(DataError, match=r"use fewer than 4 processes, or add at least 5 image\(s\)"):
        check_one_batch(3, 2, 4)


# ---------------------------------------------------------------------------------------------- 4. mistyped flags
@pytest.mark.parametrize("argv, line", [
    (["pretrain", "--epocs", "3"], "mimkit pretrain: error: unknown flag --epocs; did you mean --epochs?"),
    (["knn", "--checkpoint", "x", "--temprature", "0.1"],  # before argparse's 'required: --data_path'
     "mimkit knn: error: unknown flag --temprature; did you mean --temperature?"),
    (["continual", "--epochs=3", "--freez_mode", "none"],
     "mimkit continual: error: unknown flag --freez_mode; did you mean --freeze_mode?"),
    (["pretrain", "--max", "3"], "mimkit pretrain: error: unknown flag --max (flags are not abbreviated: did you "
                                 "mean --max_steps?)"),
    (["pretrain", "--epochs", "abc"], "mimkit pretrain: error: argument --epochs: invalid int value: 'abc'"),
])
def test_a_mistyped_flag_is_one_line_and_a_help_hint(argv, line, capsys) -> None:
    from mimkit.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2
    assert err == [line, f"(`mimkit {argv[0]} --help` lists every flag with its default)"]  # no usage block


# ---------------------------------------------------------------------------------------------- 6. help defaults
def _helps() -> dict[str, dict[str, str]]:
    """{command: {flag: its help as printed}} of every command."""
    import argparse

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {a.option_strings[0]: sp._get_formatter()._expand_help(a)
                   for a in sp._actions if a.option_strings and a.help and a.help != argparse.SUPPRESS}
            for name, sp in sub.choices.items()}


def test_every_flag_states_one_plain_default() -> None:
    for command, flags in _helps().items():
        for flag, text in flags.items():
            if flag in ("-h", "--help", "--version"):
                continue
            m = re.findall(r"\(default: ([^)]*)\)", text)
            assert len(m) <= 1, f"mimkit {command} {flag}: {text!r}"
            if m:  # one value, not 'off, key = true' (two defaults that contradict each other at a glance)
                assert "=" not in m[0] and not re.match(r"(off|on), ", m[0]), f"mimkit {command} {flag}: {text!r}"
    pre = _helps()["pretrain"]
    assert pre["--pin_mem"].endswith("sets data.pin_memory to true (default: true)")
    assert pre["--no_pin_mem"].endswith("sets data.pin_memory to false (default: true)")
    assert pre["--norm_pix_loss"].endswith("sets model.norm_pix_loss to true (default: false)")
    assert pre["--patch_size"].endswith("sets model.kwargs.patch_size (default: the model's own)")
    assert _helps()["finetune"]["--global_pool"].endswith("sets model.global_pool to true (default: true)")


def test_continual_sweep_on_builtin_domains_takes_the_sweep_recipe() -> None:
    cfg = _continual_cfg("--sweep", "--domains", "photos", "textures")
    assert cfg.misc.preset == "continual/sweep.yaml" and cfg.model.type == "mae_vit_nano_patch8"
    assert list(cfg.continual.domains) == ["photos", "textures"]
    assert "photos" not in cfg.continual.eval_domains and cfg.continual.base_data == "photos"


def test_examples_still_pass_flags_on_to_continual(capsys) -> None:
    from mimkit.cli import main

    assert main(["examples", "--dry_run", "2b", "--data_path", "/mine"]) == 0
    assert "--data_path /mine" in capsys.readouterr().out


def test_space_separated_channel_values_say_comma_separated(tmp_path, capsys) -> None:
    from mimkit.cli import main

    rc = main(["pretrain", "--mean", "0.5", "0.4", "0.3", "--output_dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "comma-separated" in err[0] and "0.4, 0.3" in err[0]
    assert not (tmp_path / "r").exists()
