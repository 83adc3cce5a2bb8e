"""mimkit.data.images: every image mode read right, from real files written with PIL, pixel values checked."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.data import images as I
from mimkit.data.datasets import image_folder
from mimkit.data.images import read_image, to_mode
from mimkit.data.transforms import eval_transform


def _png16(path: Path, arr: np.ndarray) -> Path:
    """Write a 16-bit-per-sample PNG by hand (PIL cannot write 48-bit RGB): (H, W, C) uint16, C in 1/3."""
    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def test_16bit_grayscale_png_is_scaled_not_white(tmp_path):
    g = np.array([[0, 257 * 10], [32768, 65535]], dtype=np.uint16)
    Image.fromarray(g).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as f:
        assert f.mode.startswith("I;16")  # what the bug report saw: convert("RGB") makes this white
    rgb = np.asarray(read_image(tmp_path / "g16.png"))
    assert rgb.shape == (2, 2, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert rgb[..., 0].tolist() == [[0, 10], [128, 255]]  # v * 255 / 65535, rounded
    assert np.asarray(read_image(tmp_path / "g16.png", "L")).tolist() == [[0, 10], [128, 255]]


def test_16bit_grayscale_written_by_hand_is_scaled_by_its_bit_depth(tmp_path):
    g = np.full((4, 4, 1), 4095, dtype=np.uint16)  # a 12-bit camera's maximum in a 16-bit file
    gray = np.asarray(read_image(_png16(tmp_path / "g.png", g), "L"))
    assert (gray == 255).all()  # 12-bit data: 4095 * 255 / 4095 (it read 16, nearly black, as v * 255 / 65535)
    g[0, 0] = 4096  # one value above 12 bits: a 16-bit image, the 16-bit factor for every pixel
    gray = np.asarray(read_image(_png16(tmp_path / "g16.png", g), "L"))
    assert gray[0, 0] == 16 and gray[1, 1] == 16


def test_16bit_rgb_png(tmp_path):
    a = np.zeros((1, 2, 3), dtype=np.uint16)
    a[0, 0] = (65535, 32768, 0x0A0A)
    a[0, 1] = (0x1234, 0, 0xFFFF)
    rgb = np.asarray(read_image(_png16(tmp_path / "rgb16.png", a)))
    assert rgb.tolist() == [[[255, 128, 10], [0x12, 0, 255]]]


def test_8bit_grayscale_and_rgb(tmp_path):
    Image.fromarray(np.array([[0, 77], [200, 255]], np.uint8), "L").save(tmp_path / "l.png")
    assert np.asarray(read_image(tmp_path / "l.png"))[..., 1].tolist() == [[0, 77], [200, 255]]
    Image.fromarray(np.array([[[10, 20, 30]]], np.uint8), "RGB").save(tmp_path / "rgb.png")
    assert np.asarray(read_image(tmp_path / "rgb.png")).tolist() == [[[10, 20, 30]]]
    assert np.asarray(read_image(tmp_path / "rgb.png", "L")).tolist() == [[round(10 * .299 + 20 * .587 + 30 * .114)]]


def test_32bit_int_and_float_tiff(tmp_path):
    Image.fromarray(np.array([[0, 1000], [30000, 65535]], np.int32), "I").save(tmp_path / "i.tif")
    assert np.asarray(read_image(tmp_path / "i.tif", "L")).tolist() == [[0, 4], [117, 255]]
    Image.fromarray(np.array([[0.0, 0.5], [0.25, 1.0]], np.float32), "F").save(tmp_path / "f.tif")
    assert np.asarray(read_image(tmp_path / "f.tif", "L")).tolist() == [[0, 128], [64, 255]]
    Image.fromarray(np.array([[-1.0, 1.0]], np.float32), "F").save(tmp_path / "wide.tif")  # any range: min-max
    assert np.asarray(read_image(tmp_path / "wide.tif", "L")).tolist() == [[0, 255]]


def test_rgba_is_composited_on_white_and_said_once(tmp_path):
    px = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 255, 128]]], np.uint8)
    Image.fromarray(px, "RGBA").save(tmp_path / "a.png")
    rgb = np.asarray(read_image(tmp_path / "a.png"))
    assert rgb[0, 0].tolist() == [255, 0, 0]  # opaque: unchanged
    assert rgb[0, 1].tolist() == [255, 255, 255]  # fully transparent: the white background
    assert rgb[0, 2].tolist() == pytest.approx([127, 127, 255], abs=1)  # half: blended with white
    notes = I.scan_images([tmp_path / "a.png", tmp_path / "a.png"])  # a run's note: one line, with the count
    assert len(notes) == 1 and "2 image(s) have transparency" in notes[0] and "white background" in notes[0]


def test_la_is_composited_on_white(tmp_path):
    Image.fromarray(np.array([[[0, 255], [0, 0]]], np.uint8), "LA").save(tmp_path / "la.png")
    assert np.asarray(read_image(tmp_path / "la.png", "L")).tolist() == [[0, 255]]


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    img.save(tmp_path / "p_opaque.png")  # without transparency: green stays green
    img.save(tmp_path / "p.png", transparency=1)  # palette entry 1 (green) is transparent
    with Image.open(tmp_path / "p.png") as f:
        assert f.mode == "P" and f.info["transparency"] == 1
    assert np.asarray(read_image(tmp_path / "p.png")).tolist() == [[[255, 0, 0], [255, 255, 255]]]
    assert np.asarray(read_image(tmp_path / "p_opaque.png")).tolist() == [[[255, 0, 0], [0, 255, 0]]]


def test_cmyk_tiff(tmp_path):
    px = np.array([[[0, 255, 255, 0], [0, 0, 0, 0], [0, 0, 0, 255]]], np.uint8)  # red, white, black
    Image.fromarray(px, "CMYK").save(tmp_path / "c.tif")
    assert np.asarray(read_image(tmp_path / "c.tif")).tolist() == [[[255, 0, 0], [255, 255, 255], [0, 0, 0]]]


def test_bilevel(tmp_path):
    Image.fromarray(np.array([[True, False]])).convert("1").save(tmp_path / "b.png")
    assert np.asarray(read_image(tmp_path / "b.png", "L")).tolist() == [[255, 0]]


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((2, 4, 3), np.uint8)  # 2 high, 4 wide; the top-left pixel red
    arr[0, 0] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(arr).save(tmp_path / "o.png", exif=exif)
    out = np.asarray(read_image(tmp_path / "o.png"))
    assert out.shape == (4, 2, 3)  # displayed portrait
    assert out[0, 1].tolist() == [255, 0, 0]  # the top-left corner went to the top-right
    assert out.sum() == 255


def test_every_loader_uses_the_reader(tmp_path):
    """A folder of 16-bit images reaches the model as grey, not white (the pretraining bug of the report)."""
    d = tmp_path / "set" / "c0"
    d.mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(d / "x.png")
    ds = image_folder(tmp_path / "set", eval_transform(8, 3, mean=[0, 0, 0], std=[1, 1, 1]))
    x, _ = ds[0]
    assert torch.allclose(x, torch.full_like(x, 128 / 255), atol=1e-6)


def test_to_mode_of_an_in_memory_16bit_image_via_transform():
    img = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    x = eval_transform(8, 1, mean=[0], std=[1])(img)
    assert x.shape == (1, 8, 8) and torch.allclose(x, torch.ones_like(x))
    assert to_mode(Image.new("RGB", (1, 1)), "RGB").mode == "RGB"
