"""Hostile and unusual images (issue 12) for `fnclass predict` and `fnclass data prepare DIR`.

Undecodable files and decompression bombs are one ``error:`` line naming the file (exit code 2, nothing written);
every PNG/JPEG mode becomes RGB by the rules in docs/data.md, checked against hand-computed pixels.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from fnclass import data
from fnclass.cli import main
from fnclass.data import MAX_IMAGE_PIXELS, DataError, read_image
from tests.oneline import one_error_line


def png_bytes(width: int, height: int, color_type: int, depth: int, idat: bytes) -> bytes:
    """A PNG written by hand: signature, IHDR, one IDAT holding ``idat`` (already compressed), IEND."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def zero_rows(width: int, height: int) -> bytes:
    """The zlib stream of an all-black 8-bit grey image: every row is a filter byte 0 and ``width`` zeros."""
    stream, left = zlib.compressobj(9), (width + 1) * height
    parts = []
    while left:
        parts.append(stream.compress(bytes(min(left, 1 << 22))))
        left -= min(left, 1 << 22)
    return b"".join(parts) + stream.flush()


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _noise(height: int = 16, width: int = 16) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


UNREADABLE = {
    "random bytes": ("x.png", bytes(np.random.default_rng(0).integers(0, 256, 600, dtype=np.uint8))),
    "truncated PNG": ("x.png", encoded(_noise(), "PNG")[:-40]),
    "truncated JPEG": ("x.jpg", encoded(_noise(64, 64), "JPEG")[:400]),
    "PNG with a bad checksum": ("x.png", encoded(_noise(), "PNG")[:30] + b"\0\0" + encoded(_noise(), "PNG")[32:]),
    "empty file": ("x.png", b""),
    "GIF named .png": ("x.png", encoded(_noise(), "GIF")),  # only PNG and JPEG are decoded
}


@pytest.mark.parametrize("case", UNREADABLE)
def test_undecodable_image_is_one_line_for_predict_and_prepare(tmp_path, tiny_checkpoint, case):
    name, payload = UNREADABLE[case]
    model_bytes = tiny_checkpoint.read_bytes()
    image = tmp_path / name
    image.write_bytes(payload)
    one_error_line(["predict", str(tiny_checkpoint), str(image)], f"{image} is not a readable image")
    for label in ("a", "b"):
        for index in range(2):
            (tmp_path / "src" / label).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "src" / label / f"{index}.png")
    broken = tmp_path / "src" / "b" / name
    broken.write_bytes(payload)
    one_error_line(["data", "prepare", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--test-fraction",
                    "0.5"], f"{broken} is not a readable image")
    assert not (tmp_path / "out").exists() and tiny_checkpoint.read_bytes() == model_bytes


def test_a_folder_or_missing_file_is_not_an_image(tmp_path, tiny_checkpoint):
    one_error_line(["predict", str(tiny_checkpoint), str(tmp_path)], f"{tmp_path} is not a file")
    one_error_line(["predict", str(tiny_checkpoint), str(tmp_path / "gone.png")], "gone.png is missing")


def test_damaged_exif_is_read_without_its_rotation_and_without_warnings(tmp_path, tiny_checkpoint):
    """An orientation tag whose data lies past the end of the block: Pillow warns and skips it; stderr stays empty."""
    tiff = b"MM\x00\x2a" + struct.pack(">IH", 8, 1) + struct.pack(">HHII", 0x0112, 3, 1000, 100) + bytes(4)
    path = tmp_path / "damaged.jpg"
    path.write_bytes(encoded(Image.new("RGB", (16, 8), (10, 20, 30)), "JPEG", exif=b"Exif\x00\x00" + tiff))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_image(path, (8, 16)).shape == (8, 16, 3)
    result = CliRunner().invoke(main, ["predict", str(tiny_checkpoint), str(path), "--json"])
    assert result.exit_code == 0 and result.stderr == "", result.output


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:
    """Tiny PNGs whose headers claim 10**10 pixels (Pillow refuses) and 10**8 (Pillow only warns, then decodes)."""
    folder = tmp_path_factory.mktemp("bombs")
    (folder / "huge.png").write_bytes(png_bytes(100_000, 100_000, 0, 8, zero_rows(100_000, 1)))
    # A real stream: decoded it is 100 MB of grey (400 MB as RGB); compressed it is about 100 KB.
    (folder / "warning.png").write_bytes(png_bytes(10_000, 10_000, 0, 8, zero_rows(10_000, 10_000)))
    return {path.stem: path for path in folder.iterdir()}


@pytest.mark.parametrize("bomb", ["huge", "warning"])
def test_decompression_bomb_is_refused_before_decoding(bombs, tiny_checkpoint, tmp_path, monkeypatch, bomb):
    path = bombs[bomb]
    assert path.stat().st_size < 200_000 and 10_000 * 10_000 > MAX_IMAGE_PIXELS
    real_load = ImageFile.ImageFile.load

    def load(self):
        if self.width >= 10_000:
            pytest.fail("the bomb was decoded")
        return real_load(self)
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(DataError, match=f"{path} is too large to decode .*at most 89,478,485 pixels"):
            read_image(path, 32)
        one_error_line(["predict", str(tiny_checkpoint), str(path)], str(path), "too large to decode")
        (tmp_path / "src" / "a").mkdir(parents=True)
        (tmp_path / "src" / "b").mkdir()
        for index in range(2):
            Image.new("RGB", (8, 8)).save(tmp_path / "src" / "a" / f"{index}.png")
            (tmp_path / "src" / "b" / f"{index}.png").write_bytes(path.read_bytes())
        one_error_line(["data", "prepare", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--test-fraction",
                        "0.5"], "too large to decode")
    assert not (tmp_path / "out").exists()


def test_the_pixel_limit_refuses_only_what_is_over_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 100 * 100)
    (tmp_path / "at.png").write_bytes(png_bytes(100, 100, 0, 8, zero_rows(100, 100)))
    (tmp_path / "over.png").write_bytes(png_bytes(101, 100, 0, 8, zero_rows(101, 100)))
    assert (read_image(tmp_path / "at.png", 4) == 0).all()
    with pytest.raises(DataError, match=r"too large to decode \(101 x 100 pixels\): images may have at most 10,000"):
        read_image(tmp_path / "over.png", 4)


def _palette(transparency=None) -> Image.Image:
    image = Image.new("P", (3, 1))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    image.putdata([0, 1, 2])
    if transparency is not None:
        image.info["transparency"] = transparency
    return image


def _over_black(rgba) -> np.ndarray:
    """The hand computation of compositing onto black: each channel times alpha / 255, rounded to nearest."""
    rgba = np.array(rgba, dtype=np.int64)
    return np.array([[[round(c * a / 255) for c in pixel[:3]] for pixel in row for a in [pixel[3]]]
                     for row in rgba], dtype=np.uint8)


def _grey(values) -> np.ndarray:
    return np.repeat(np.array(values, dtype=np.uint8)[None, :, None], 3, axis=2)


RGBA = [[[200, 100, 50, 128], [10, 20, 30, 255], [255, 255, 255, 0], [90, 180, 255, 1]]]
GREY16 = [0, 255, 256, 25700, 65535, 1000]
CMYK = (10, 100, 200, 50)
# name: (file suffix, the file's bytes, the mode Pillow opens it in, the RGB read_image must return at its own size)
MODES = {
    "RGBA": (".png", lambda: encoded(Image.fromarray(np.array(RGBA, np.uint8), "RGBA"), "PNG"), "RGBA",
             _over_black(RGBA)),
    "LA": (".png", lambda: encoded(Image.fromarray(np.array([[[200, 64], [100, 255]]], np.uint8), "LA"), "PNG"), "LA",
           _grey([round(200 * 64 / 255), 100])),
    "P": (".png", lambda: encoded(_palette(), "PNG"), "P",
          np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8)),
    "P, transparent index": (".png", lambda: encoded(_palette(1), "PNG"), "P",
                             np.array([[[255, 0, 0], [0, 0, 0], [0, 0, 255]]], np.uint8)),
    "P, alpha per entry": (".png", lambda: encoded(_palette(), "PNG", transparency=bytes([255, 128, 0])), "P",
                           np.array([[[255, 0, 0], [0, round(255 * 128 / 255), 0], [0, 0, 0]]], np.uint8)),
    "RGB, transparent colour": (".png", lambda: encoded(Image.fromarray(np.array([[[10, 20, 30], [40, 50, 60]]],
                                                                                  np.uint8)), "PNG",
                                                        transparency=(10, 20, 30)), "RGB",
                                np.array([[[0, 0, 0], [40, 50, 60]]], np.uint8)),
    # 16-bit grey keeps its high byte (Pillow's own convert would clip 256 and up to 255), as Pillow does for
    # 16-bit colour.
    "16-bit grey": (".png", lambda: encoded(Image.fromarray(np.array([GREY16], np.uint16)), "PNG"), "I;16",
                    _grey([v >> 8 for v in GREY16])),
    "16-bit RGB": (".png", lambda: png_bytes(2, 1, 2, 16, zlib.compress(b"\0" + struct.pack(">6H", *GREY16))), "RGB",
                   np.array([[[v >> 8 for v in GREY16[:3]], [v >> 8 for v in GREY16[3:]]]], np.uint8)),
    "1-bit": (".png", lambda: encoded(Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1"), "PNG"), "1",
              _grey([0, 255])),
    "L": (".png", lambda: encoded(Image.fromarray(np.array([[3, 250]], np.uint8)), "PNG"), "L", _grey([3, 250])),
    # CMYK comes only as JPEG; r = (255 - c)(255 - k) / 255. An 8 x 8 block of one colour at quality 100 keeps
    # only its DC coefficient, quantised in steps of 1/8 of a level: it decodes to within one level.
    "CMYK": (".jpg", lambda: encoded(Image.new("CMYK", (8, 8), CMYK), "JPEG", quality=100), "CMYK",
             np.full((8, 8, 3), [round((255 - c) * (255 - CMYK[3]) / 255) for c in CMYK[:3]], np.uint8)),
}


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_becomes_the_hand_computed_rgb(tmp_path, mode):
    suffix, make, opened, expected = MODES[mode]
    path = tmp_path / f"image{suffix}"
    path.write_bytes(make())
    with Image.open(path) as image:
        assert image.mode == opened  # the file exercises the conversion it is named after
    out = read_image(path, expected.shape[:2])
    assert out.dtype == np.uint8 and out.shape == expected.shape
    tolerance = 1 if suffix == ".jpg" else 0  # PNG is lossless: exact
    assert np.abs(out.astype(int) - expected).max() <= tolerance, (out, expected)


def test_image_folder_converts_every_mode_the_same_way(tmp_path):
    """`fnclass data prepare DIR` stores exactly what read_image gives, one class per mode."""
    names = [mode for mode in MODES if MODES[mode][3].shape[:2] == (1, 3)] + ["RGBA"]
    for label, mode in enumerate(names):
        suffix, make, _, _ = MODES[mode]
        for split in ("train", "test"):
            (tmp_path / "src" / split / f"{label}").mkdir(parents=True)
            (tmp_path / "src" / split / f"{label}" / f"image{suffix}").write_bytes(make())
    result = CliRunner().invoke(main, ["data", "prepare", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                                       "--size", "3"])
    assert result.exit_code == 0, result.output
    loaded = data.load_split(tmp_path / "out", "test")
    for image, label in zip(*loaded):
        mode = names[int(label)]
        path = next((tmp_path / "src" / "test" / f"{int(label)}").iterdir())
        assert (image.numpy() == read_image(path, 3)).all(), mode


@pytest.mark.parametrize("orientation, top, bottom", [(6, (255, 0, 0), (0, 0, 255)), (8, (0, 0, 255), (255, 0, 0))])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied(tmp_path, orientation, top, bottom, fmt):
    """A 32 x 16 landscape, red left and blue right, tagged to be shown turned 90 degrees: 6 clockwise, 8 against."""
    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:, :16], stored[:, 16:] = (255, 0, 0), (0, 0, 255)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    path = tmp_path / f"turned.{fmt.lower()}"
    # JPEG: 4:4:4 at quality 100, and the colour edge on an 8 x 8 block edge, so each block is flat (see CMYK).
    path.write_bytes(encoded(image, fmt, exif=exif, **({"quality": 100, "subsampling": 0} if fmt == "JPEG" else {})))
    out = read_image(path, (32, 16)).astype(int)  # shown upright: 16 wide, 32 tall
    tolerance = 1 if fmt == "JPEG" else 0
    assert np.abs(out[:16] - top).max() <= tolerance and np.abs(out[16:] - bottom).max() <= tolerance


def test_prepare_size_is_bounded(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"image size must be 1\.\.4096 pixels, got 100000"):
        data.prepare_image_folder(tmp_path / "src", tmp_path / "out", size=100_000)
    one_error_line(["data", "prepare", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--size", "100000"],
                   "1..4096")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def sample_images() -> list[bytes]:
    """A PNG with transparency and a JPEG carrying EXIF (orientation 6), small enough to fuzz quickly."""
    image = _noise(12, 10)
    exif = image.getexif()
    exif[0x0112] = 6
    return [encoded(image.convert("RGBA"), "PNG"), encoded(image, "JPEG", exif=exif)]


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_image_bytes_decode_or_fail_in_one_line(sample_images, tmp_path, data):
    """Random bytes written into a valid PNG or JPEG (headers, EXIF, data) and a random cut: RGB or one DataError."""
    blob = bytearray(data.draw(st.sampled_from(sample_images)))
    for position, value in data.draw(st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(0, 255)),
                                              min_size=1, max_size=6)):
        blob[position] = value
    path = tmp_path / "fuzzed.png"
    path.write_bytes(bytes(blob[:data.draw(st.integers(0, len(blob)))]))
    try:
        out = read_image(path, 8)
    except DataError as error:
        assert str(error).startswith(str(path)) and "\n" not in str(error)
    else:
        assert out.shape == (8, 8, 3) and out.dtype == np.uint8
