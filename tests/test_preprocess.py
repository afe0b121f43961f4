import numpy as np
import pytest

from hwexp.data.errors import ConfigError
from hwexp.data.preprocess import PreprocessOptions, normalise_characters


def cross(h=128, w=128, ink=255, background=0, top=30, left=40, size=50, width=8):
    image = np.full((h, w), background, np.uint8)
    image[top + size // 2 : top + size // 2 + width, left : left + size] = ink
    image[top : top + size, left + size // 2 : left + size // 2 + width] = ink
    return image


def test_output_contract():
    out = normalise_characters(np.stack([cross(), cross(top=10)]))
    assert out.shape == (2, 48, 48) and out.dtype == np.uint8
    assert out.max() == 255 and out.min() == 0


def test_ink_polarity_is_detected_per_image():
    dark_on_light = cross(ink=0, background=255)
    light_on_dark = cross()
    out = normalise_characters(np.stack([dark_on_light, light_on_dark]), ink="auto")
    assert out[0].mean() < 128  # ink is the minority, and bright
    np.testing.assert_allclose(out[0].astype(int), out[1].astype(int), atol=2)


def test_faint_grey_scan_is_stretched_to_full_contrast():
    faint = cross(ink=120, background=90)
    strong = cross()
    out = normalise_characters(np.stack([faint, strong]))
    assert out[0].max() >= 250
    assert np.abs(out[0].astype(int) - out[1].astype(int)).mean() < 3


def test_crop_and_centre_make_position_and_scale_irrelevant():
    small_corner = cross(top=5, left=5, size=30, width=5)
    big_centre = cross(top=20, left=20, size=80, width=13)
    out = normalise_characters(
        np.stack([small_corner, big_centre]), options=PreprocessOptions(min_crop=0.0)
    )
    ink = out > 128
    rows = [np.flatnonzero(m.any(axis=1)) for m in ink]
    cols = [np.flatnonzero(m.any(axis=0)) for m in ink]
    for r, c in zip(rows, cols, strict=True):
        margin = round(48 * 0.08)
        assert abs(r[0] - margin) <= 2 and abs(47 - r[-1] - margin) <= 2
        assert abs(c[0] - margin) <= 2 and abs(47 - c[-1] - margin) <= 2


def test_aspect_ratio_is_kept_when_padding_to_square():
    bar = np.zeros((128, 128), np.uint8)
    bar[60:70, 20:108] = 255  # wide and flat, like ー
    out = normalise_characters(bar[None])[0]
    ink_rows = np.flatnonzero((out > 128).any(axis=1))
    assert len(ink_rows) < 12  # still flat, not stretched to a square block
    no_aspect = PreprocessOptions(keep_aspect=False, min_crop=0.0)
    stretched = normalise_characters(bar[None], options=no_aspect)[0]
    assert len(np.flatnonzero((stretched > 128).any(axis=1))) > 36


def test_specks_and_border_fragments_are_removed():
    clean = cross()
    dirty = clean.copy()
    dirty[100:102, 10:12] = 255  # a speck
    dirty[0:12, 50:90] = 255  # a neighbour's stroke poking in from the top edge
    dirty[110:128, 0:6] = 255  # and one from the left edge
    out = normalise_characters(np.stack([dirty, clean]))
    assert np.abs(out[0].astype(int) - out[1].astype(int)).mean() < 2


def test_stroke_touching_border_that_is_the_character_is_kept():
    big = np.zeros((128, 128), np.uint8)
    big[0:128, 60:70] = 255  # a long vertical stroke from edge to edge: the character itself
    big[60:66, 20:110] = 255
    out = normalise_characters(big[None])[0]
    assert (out > 128).any(axis=1).sum() > 30


def test_blank_image_stays_blank():
    noise = np.random.default_rng(0).integers(0, 12, (1, 64, 64), dtype=np.uint8)
    out = normalise_characters(noise)
    assert out.max() < 40


def test_single_2d_image_and_64px_option():
    out = normalise_characters(cross(), options=PreprocessOptions(size=64))
    assert out.shape == (1, 64, 64)


def test_small_input_is_enlarged_smoothly():
    tiny = cross(28, 28, top=4, left=4, size=18, width=3)
    out = normalise_characters(tiny[None])[0]
    assert out.shape == (48, 48)
    assert len(np.unique(out)) > 4  # interpolated grey edges, not blocky nearest-neighbour


def test_bad_options_are_named():
    with pytest.raises(ConfigError, match="preprocess.size"):
        PreprocessOptions(size=2)
    with pytest.raises(ConfigError, match="bogus"):
        PreprocessOptions.from_config({"bogus": 1})
    with pytest.raises(ConfigError, match="resample"):
        PreprocessOptions(resample="magic")


def test_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        normalise_characters(np.zeros((1, 10, 10), np.float32))


def test_small_kana_stay_smaller_than_full_size():
    full = cross(top=20, left=20, size=85, width=10)  # つ-sized in its cell
    small = cross(top=60, left=30, size=40, width=6)  # っ-sized, low in its cell
    out = normalise_characters(np.stack([full, small]))
    extent = [(o > 128).any(axis=0).sum() for o in out]
    assert extent[1] < 0.75 * extent[0]
    unlimited = normalise_characters(
        np.stack([full, small]), options=PreprocessOptions(min_crop=0.0)
    )
    extent = [(o > 128).any(axis=0).sum() for o in unlimited]
    assert abs(extent[1] - extent[0]) <= 3


def test_faint_blotch_inside_the_crop_is_cleared():
    clean = cross()
    blotchy = clean.copy()
    blotchy[35:50, 45:60] = 70  # uneven background between the arms, below the ink threshold
    out = normalise_characters(np.stack([blotchy, clean]))
    assert np.abs(out[0].astype(int) - out[1].astype(int)).max() < 30
