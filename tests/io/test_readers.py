"""Slide readers: the real bundled slide, pyramids through OpenSlide and in memory, resolution rules."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pysynth.errors import SlideError
from pysynth.io import (
    ArrayReader,
    OpenSlideReader,
    best_level,
    load_rgb,
    open_slide,
    read_region,
    read_thumbnail,
)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_bundled_slide_metadata(sample_slide: Path) -> None:
    with open_slide(sample_slide, input_mpp=0.25) as slide:
        assert isinstance(slide, OpenSlideReader)
        assert slide.vendor == "aperio"
        assert slide.level_shapes_hw == ((2967, 2220),)  # 2220 wide, 2967 high
        assert slide.mpp == pytest.approx(0.499)
        assert slide.mpp_source == "metadata"  # metadata wins over --input-mpp


def test_bundled_slide_is_upsampled_to_40x(sample_slide: Path) -> None:
    with open_slide(sample_slide) as slide:
        assert best_level(slide, 0.25) == 0
        native = slide.read_level(0, 900, 1300, 200, 150)
        up = read_region(slide, 900, 1300, (300, 400), 0.25)
    assert up.shape == (300, 400, 3)
    assert up.dtype == np.uint8
    # 0.25 µm/px from 0.499 µm/px is a 1.996x enlargement; shrinking it back by 2 gives the native pixels.
    back = cv2.resize(up, (200, 150), interpolation=cv2.INTER_AREA)
    assert _psnr(back[2:-2, 2:-2], native[2:-2, 2:-2]) > 28
    # and it is registered: against the native pixels one column over, it is clearly worse
    with open_slide(sample_slide) as slide:
        shifted = slide.read_level(0, 901, 1300, 200, 150)
    assert _psnr(back[2:-2, 2:-2], native[2:-2, 2:-2]) > _psnr(back[2:-2, 2:-2], shifted[2:-2, 2:-2]) + 3


def test_native_read_is_exact(sample_slide: Path) -> None:
    with open_slide(sample_slide) as slide:
        direct = slide.read_level(0, 100, 200, 64, 32)
        via = read_region(slide, 100, 200, (32, 64), slide.mpp)
    np.testing.assert_array_equal(direct, via)


def test_reads_outside_the_slide_are_white(sample_slide: Path) -> None:
    with open_slide(sample_slide) as slide:
        corner = slide.read_level(0, -50, -50, 100, 100)
    assert (corner[:50, :] == 255).all()
    assert (corner[:, :50] == 255).all()


def _pyramid(rng: np.random.Generator) -> list[np.ndarray]:
    """A smooth random RGB image and its 2x and 4x reductions (powers of two, so downsamples are exact)."""
    base = cv2.resize(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8), (384, 320), interpolation=cv2.INTER_CUBIC)
    base = np.ascontiguousarray(base)
    return [
        base,
        cv2.resize(base, (192, 160), interpolation=cv2.INTER_AREA),
        cv2.resize(base, (96, 80), interpolation=cv2.INTER_AREA),
    ]


def _write_pyramidal_tiff(path: Path, levels: list[np.ndarray], mpp: float) -> None:
    tifffile = pytest.importorskip("tifffile")
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate(levels):
            tif.write(
                level,
                tile=(64, 64),
                photometric="rgb",
                compression="zlib",
                resolution=(1e4 / mpp / (2**i), 1e4 / mpp / (2**i)),
                resolutionunit="CENTIMETER",
                subfiletype=1 if i else 0,
            )


def test_generated_pyramidal_tiff_reads_identically(tmp_path: Path, rng: np.random.Generator) -> None:
    levels = _pyramid(rng)
    path = tmp_path / "pyramid.tiff"
    _write_pyramidal_tiff(path, levels, mpp=0.25)
    memory = ArrayReader(levels, mpp=0.25)
    with open_slide(path) as slide:
        assert isinstance(slide, OpenSlideReader)
        assert slide.mpp == pytest.approx(0.25, rel=1e-4)
        assert slide.mpp_source == "metadata"
        assert slide.level_shapes_hw == memory.level_shapes_hw == ((320, 384), (160, 192), (80, 96))
        assert slide.level_downsamples == pytest.approx(memory.level_downsamples)
        for level, image in enumerate(levels):
            np.testing.assert_array_equal(slide.read_level(level, 0, 0, image.shape[1], image.shape[0]), image)
            np.testing.assert_array_equal(slide.read_level(level, 7, 5, 33, 21), memory.read_level(level, 7, 5, 33, 21))
        # Any physical resolution and sub-pixel position: the same pixels from either reader.
        for x0, y0, mpp, shape in [
            (10, 20, 0.25, (50, 60)),
            (33.5, 17.25, 0.5, (40, 30)),
            (12, 8, 0.8, (45, 55)),
            (3.3, 4.7, 1.0, (30, 40)),
            (40, 40, 0.125, (64, 64)),
        ]:
            np.testing.assert_array_equal(
                read_region(slide, x0, y0, shape, mpp), read_region(memory, x0, y0, shape, mpp)
            )


def test_level_choice_and_downsampling_match_the_pyramid(rng: np.random.Generator) -> None:
    levels = _pyramid(rng)
    memory = ArrayReader(levels, mpp=0.25)
    assert [best_level(memory, m) for m in (0.1, 0.25, 0.4, 0.5, 0.9, 1.0, 5.0)] == [0, 0, 0, 1, 1, 2, 2]
    # Asking for a level's exact resolution returns that level's pixels unchanged.
    np.testing.assert_array_equal(read_region(memory, 64, 32, (40, 48), 0.5), levels[1][16:56, 32:80])
    # Asking for 2x coarser than level 0 without that level gives nearly the same picture.
    flat = ArrayReader(levels[:1], mpp=0.25)
    assert best_level(flat, 0.5) == 0
    assert _psnr(read_region(flat, 64, 32, (40, 48), 0.5), levels[1][16:56, 32:80]) > 30


def test_small_pyramid_level_choice(shared_data: Path) -> None:
    path = shared_data / "slides" / "small-pyramid.tiff"
    # Its resolution tag is the TIFF writer's default 72 dpi: not a microscope's, so it needs --input-mpp.
    with pytest.raises(SlideError, match="input-mpp"):
        open_slide(path)
    with open_slide(path, input_mpp=0.5) as slide:
        assert slide.mpp_source == "user"
        assert slide.level_shapes_hw == ((250, 300), (125, 150), (62, 75), (31, 37))
        ds = slide.level_downsamples
        assert ds[1] == pytest.approx(2.0)
        # The coarsest level at least as fine as asked (1% tolerance for levels like 4.016x).
        assert best_level(slide, 0.3) == 0
        assert best_level(slide, 1.0) == 1
        assert best_level(slide, 1.9) == 1
        assert best_level(slide, 2.0) == 2  # level 2 is 0.5 x 4.016 = 2.008 µm/px, within 1%
        assert best_level(slide, 3.9) == 2
        assert best_level(slide, 4.1) == 3
        assert best_level(slide, 100.0) == 3
        thumb = read_thumbnail(slide, 4.0)
        assert thumb.shape == (31, 38, 3)  # 250 x 300 px at 0.5 µm/px seen at 4 µm/px
        level1 = slide.read_level(1, 0, 0, 150, 125)
        np.testing.assert_array_equal(read_region(slide, 0, 0, (125, 150), 1.0), level1)


def test_plain_image_needs_input_mpp(tmp_path: Path, tissue_rgb: np.ndarray) -> None:
    path = tmp_path / "tile.png"
    cv2.imwrite(str(path), cv2.cvtColor(tissue_rgb, cv2.COLOR_RGB2BGR))
    with pytest.raises(SlideError, match=r"tile\.png: no resolution .* --input-mpp"):
        open_slide(path)
    with open_slide(path, input_mpp=0.5) as image:
        assert isinstance(image, ArrayReader)
        assert image.mpp == 0.5
        assert image.mpp_source == "user"
        np.testing.assert_array_equal(image.read_level(0, 0, 0, 800, 600), tissue_rgb)


def test_load_rgb_normalises_pixel_formats(tmp_path: Path) -> None:
    grey = np.arange(0, 250, 10, dtype=np.uint8).reshape(5, 5)
    cv2.imwrite(str(tmp_path / "g.png"), grey)
    np.testing.assert_array_equal(load_rgb(tmp_path / "g.png"), np.repeat(grey[..., None], 3, axis=2))
    deep = (np.arange(25, dtype=np.uint16).reshape(5, 5) * 2000)[..., None].repeat(3, axis=2)
    cv2.imwrite(str(tmp_path / "d.png"), deep)
    np.testing.assert_array_equal(
        load_rgb(tmp_path / "d.png"), (deep.astype(np.uint32) * 255 // 65535).astype(np.uint8)
    )
    bgra = np.zeros((4, 4, 4), np.uint8)
    bgra[..., 0] = 200  # blue, fully transparent on the left half
    bgra[:, 2:, 3] = 255
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    rgb = load_rgb(tmp_path / "a.png")
    assert (rgb[:, :2] == 255).all()
    assert (rgb[:, 2:] == [0, 0, 200]).all()


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        (b"hello, not a slide\n", "fake.svs", "not a slide"),
        (b"", "empty.png", "not a readable image"),
        (b"\x89PNG\r\n\x1a\n garbage", "broken.png", "not a readable image"),
        (b"plain text", "notes.txt", "unsupported file type"),
    ],
)
def test_unreadable_files_are_named(tmp_path: Path, content: bytes, name: str, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SlideError, match=message) as info:
        open_slide(path, input_mpp=0.25)
    assert info.value.path == str(path)


def test_truncated_and_damaged_slides(tmp_path: Path, sample_slide: Path) -> None:
    data = sample_slide.read_bytes()
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError, match="truncated or damaged"):
        open_slide(truncated)
    damaged = bytearray(data)
    damaged[100_000:200_000] = bytes(100_000)  # tile data zeroed: opens, but pixels cannot be decoded
    path = tmp_path / "damaged.svs"
    path.write_bytes(bytes(damaged))
    with open_slide(path) as slide, pytest.raises(SlideError, match="corrupt or truncated slide data"):
        read_thumbnail(slide, 4.0)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="no such file"):
        open_slide(tmp_path / "nope.svs")


def test_array_reader_validates() -> None:
    with pytest.raises(ValueError, match="RGB uint8"):
        ArrayReader(np.zeros((4, 4), np.uint8), mpp=0.25)
    with pytest.raises(ValueError, match="shrink"):
        ArrayReader([np.zeros((4, 4, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)], mpp=0.25)
    with pytest.raises(ValueError, match="shape_hw"):
        read_region(ArrayReader(np.zeros((4, 4, 3), np.uint8), mpp=0.25), 0, 0, (0, 4), 0.25)


def test_flatten_rgba_blends_on_white_and_passes_opaque_pixels_through() -> None:
    from pysynth.io.openslide_reader import flatten_rgba

    def blended(rgba: np.ndarray) -> np.ndarray:  # the formula pixel by pixel
        out = np.empty((*rgba.shape[:2], 3), np.uint8)
        for (i, j), _ in np.ndenumerate(rgba[..., 0]):
            a = int(rgba[i, j, 3])
            out[i, j] = [(int(v) * a + 255 * (255 - a) + 127) // 255 for v in rgba[i, j, :3]]
        return out

    rng = np.random.default_rng(0)
    opaque = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    opaque[..., 3] = 255
    flat = flatten_rgba(opaque)
    assert flat.dtype == np.uint8
    assert flat.shape == (5, 7, 3)
    assert flat.flags.c_contiguous
    np.testing.assert_array_equal(flat, opaque[..., :3])
    mixed = opaque.copy()
    mixed[1, 2, 3], mixed[4, 6, 3], mixed[0, 0, 3] = 0, 128, 254
    np.testing.assert_array_equal(flatten_rgba(mixed), blended(mixed))
    assert (flatten_rgba(mixed)[1, 2] == 255).all()  # transparent is white
