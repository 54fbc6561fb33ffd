"""Image loading: every input kind and awkward format becomes upright 8-bit RGB; bad input is an ImageError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import BAD_IMAGE_ERRORS, load_script
from PIL import Image

from caprl_local.errors import ImageError
from caprl_local.images import load_image

GOOD_SIZES = load_script("make_test_images").GOOD


@pytest.mark.parametrize("name", sorted(GOOD_SIZES))
def test_good_files_load_as_rgb(images: Path, name: str) -> None:
    img = load_image(images / name)
    assert img.mode == "RGB"
    assert img.size == GOOD_SIZES[name]


def test_alpha_is_flattened_onto_white(images: Path) -> None:
    img = load_image(images / "alpha.png")
    assert img.getpixel((0, 120)) == (255, 255, 255)  # fully transparent column
    assert img.getpixel((319, 120)) != (255, 255, 255)  # opaque column keeps its colour


def test_sixteen_bit_is_scaled_not_clipped(images: Path) -> None:
    arr = np.asarray(load_image(images / "deep16.png"))
    assert arr.min() == 0 and arr.max() == 255
    assert len(np.unique(arr[..., 0])) > 200  # a full ramp, not a clipped white image


def test_animation_gives_first_frame(images: Path) -> None:
    with Image.open(images / "animated.gif") as gif:
        first = np.asarray(gif.convert("RGB"))
    assert np.array_equal(np.asarray(load_image(images / "animated.gif")), first)


def test_bytes_pil_and_array_inputs(images: Path) -> None:
    from_path = np.asarray(load_image(images / "photo.jpg"))
    assert np.array_equal(np.asarray(load_image((images / "photo.jpg").read_bytes())), from_path)
    with Image.open(images / "photo.jpg") as pil:
        assert np.array_equal(np.asarray(load_image(pil)), from_path)
    assert np.array_equal(np.asarray(load_image(from_path)), from_path)
    grey = load_image(np.zeros((4, 5), np.uint8))
    assert grey.mode == "RGB" and grey.size == (5, 4)
    floats = np.asarray(load_image(np.ones((2, 2, 3), np.float32)))
    assert (floats == 255).all()
    rgba = load_image(np.zeros((3, 3, 4), np.uint8))  # fully transparent: white
    assert rgba.getpixel((1, 1)) == (255, 255, 255)


@pytest.mark.parametrize(("name", "words"), BAD_IMAGE_ERRORS)
def test_bad_files_raise_image_error_naming_the_file(images: Path, name: str, words: str) -> None:
    with pytest.raises(ImageError) as info:
        load_image(images / name)
    message = str(info.value)
    assert str(images / name) in message and words in message
    assert "\n" not in message


def test_directory_is_refused(images: Path) -> None:
    with pytest.raises(ImageError, match="is a directory"):
        load_image(images)


def test_pixel_limit_is_checked_before_decoding(images: Path) -> None:
    with pytest.raises(ImageError, match="megapixel limit"):
        load_image(images / "photo.jpg", max_pixels=1000)


@pytest.mark.parametrize(
    "bad",
    [b"", b"\x00\x01garbage", np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2), np.int64), np.full((2, 2), np.nan), 42],
)
def test_bad_in_memory_inputs(bad: object) -> None:
    with pytest.raises(ImageError):
        load_image(bad)  # type: ignore[arg-type]


def test_a_format_pillow_lacks_is_an_image_error(tmp_path: Path) -> None:
    """Pillow raises NotImplementedError for DDS pixel formats it cannot decode: still this image's error."""
    dds = tmp_path / "texture.dds"
    dds.write_bytes(load_script("make_test_images").dds_unimplemented())
    for source in (dds, dds.read_bytes()):
        with pytest.raises(ImageError, match="cannot decode this image .NotImplementedError"):
            load_image(source)


def test_one_unreadable_image_never_stops_a_batch(captioner, images: Path, tmp_path: Path) -> None:
    dds = tmp_path / "texture.dds"
    dds.write_bytes(load_script("make_test_images").dds_unimplemented())
    results = list(captioner.caption_many([images / "photo.jpg", dds, images / "alpha.png"], max_tokens=4))
    assert [type(r).__name__ for r in results] == ["Caption", "CaptionFailure", "Caption"]
    assert results[1].kind == "ImageError" and str(dds) in results[1].error


def test_a_layered_photoshop_file_gives_its_composite(tmp_path: Path) -> None:
    psd = tmp_path / "layers.psd"
    psd.write_bytes(load_script("make_test_images").psd_two_layers())
    img = load_image(psd)
    assert img.size == (64, 48) and img.getpixel((1, 1)) == (40, 40, 200)  # the composite, front layer on top


def test_a_later_frame_of_an_animation_gives_the_first(images: Path) -> None:
    with Image.open(images / "animated.gif") as gif:
        first = np.asarray(gif.convert("RGB"))
        gif.seek(2)
        assert np.array_equal(np.asarray(load_image(gif)), first)
