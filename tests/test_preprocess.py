import numpy as np
import pytest

from hwexp.data.preprocess import PreprocessOptions, normalise_characters
from hwexp.errors import ConfigError


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
        np.stack([small_corner, big_centre]), options=PreprocessOptions(fit="box", min_crop=0.0)
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
    no_aspect = PreprocessOptions(fit="box", keep_aspect=False, min_crop=0.0)
    stretched = normalise_characters(bar[None], options=no_aspect)[0]
    assert len(np.flatnonzero((stretched > 128).any(axis=1))) > 36


def test_specks_and_border_fragments_are_removed():
    clean = cross()
    dirty = clean.copy()
    dirty[100:102, 10:12] = 255  # a speck
    dirty[0:8, 50:66] = 255  # a neighbour's stroke poking in from the top edge
    dirty[110:128, 0:6] = 255  # and one from the left edge
    for first, second in ((dirty, clean), (clean, dirty)):  # wherever it is in the batch
        out = normalise_characters(np.stack([first, second]))
        assert np.abs(out[0].astype(int) - out[1].astype(int)).mean() < 2


def test_border_component_large_against_the_ink_is_kept():
    # Within the band along the top edge, but 40% of the image's ink: not a fragment.
    image = cross()
    image[0:12, 50:90] = 255
    out = normalise_characters(np.stack([cross(), image]))
    assert np.abs(out[0].astype(int) - out[1].astype(int)).mean() > 10


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


# The batched implementation against references: PIL's resampling, labelling every image.


def _pil_resize(image: np.ndarray, box, size: int, name: str) -> np.ndarray:
    """PIL's resize of ``box`` with the image zero-padded, so pixels outside it count as 0."""
    from PIL import Image

    methods = {
        "box": Image.Resampling.BOX,
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "lanczos": Image.Resampling.LANCZOS,
    }
    pad = 64
    padded = Image.fromarray(np.pad(image, pad))
    return np.asarray(padded.resize((size, size), methods[name], box=tuple(np.add(box, pad))))


def _pil_resize_all(images: np.ndarray, boxes: np.ndarray, size: int, name: str) -> np.ndarray:
    return np.stack([_pil_resize(i, b, size, name) for i, b in zip(images, boxes, strict=True)])


def _random_boxes(rng, n: int, low: float, high: float) -> np.ndarray:
    x0, y0 = rng.uniform(-8, 16, n), rng.uniform(-8, 16, n)
    side = rng.uniform(low, high, n)
    return np.stack([x0, y0, x0 + side, y0 + side * rng.uniform(0.8, 1.2, n)], axis=1)


@pytest.mark.parametrize("size", [16, 24, 100])  # shrinking, shrinking, enlarging
@pytest.mark.parametrize("name", ["box", "bilinear"])
def test_batched_resize_matches_pil_on_noise(size, name):
    from hwexp.data.preprocess import _resize_all

    rng = np.random.default_rng(size)
    images = rng.integers(0, 256, (40, 57, 63), dtype=np.uint8)
    boxes = _random_boxes(rng, 40, 30, 70)  # some reach past the border
    ours = _resize_all(images, boxes, PreprocessOptions(size=size, resample=name))
    reference = _pil_resize_all(images, boxes, size, name)
    # PIL rounds to uint8 between its two passes; the batched resize sums exactly.
    assert np.abs(np.rint(ours) - reference).max() <= 1


def test_a_lone_image_resizes_to_the_bit_as_in_a_batch():
    # One or two images take dense products (the drawing pad's path), batches sparse ones.
    from hwexp.data.preprocess import _resize_all

    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (12, 128, 121), dtype=np.uint8)
    boxes = _random_boxes(rng, 12, 50, 140)  # shrinking to 48, some past the border
    options = PreprocessOptions(size=48)
    batch = _resize_all(images, boxes, options)
    alone = [_resize_all(images[i : i + 1], boxes[i : i + 1], options)[0] for i in range(12)]
    np.testing.assert_array_equal(np.stack(alone), batch)
    np.testing.assert_array_equal(_resize_all(images[:2], boxes[:2], options), batch[:2])
    assert np.abs(np.rint(batch) - _pil_resize_all(images, boxes, 48, "box")).max() <= 1


@pytest.mark.parametrize("size", [16, 100])
@pytest.mark.parametrize("name", ["bicubic", "lanczos"])
def test_batched_resize_matches_pil_on_smooth_images(size, name):
    # On noise PIL's clipping between passes (negative lobes) differs more; on smooth
    # images without sharp steps there is nothing to clip.
    from scipy import ndimage

    from hwexp.data.preprocess import _resize_all

    rng = np.random.default_rng(size)
    blobs = np.zeros((30, 60, 70))
    blobs[:, 15:45, 15:55] = rng.uniform(0, 1, (30, 30, 40))
    blobs = ndimage.gaussian_filter(blobs, (0, 3, 3))
    images = (blobs / blobs.max() * 255).astype(np.uint8)
    boxes = _random_boxes(rng, 30, 30, 50)
    ours = _resize_all(images, boxes, PreprocessOptions(size=size, resample=name))
    reference = _pil_resize_all(images, boxes, size, name)
    assert np.abs(np.rint(ours) - reference).max() <= 1


def _messy_characters(n: int, side: int = 128, seed: int = 0) -> np.ndarray:
    """Crosses of random size and place with specks, edge fragments and faint blotches."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        size = int(rng.integers(side // 6, side * 3 // 4))
        top, left = (int(v) for v in rng.integers(0, side - size, 2))
        ink, background = int(rng.integers(120, 256)), int(rng.integers(0, 60))
        width = int(rng.integers(2, max(3, size // 6)))
        image = cross(side, side, ink, background, top, left, size, width)
        for _ in range(int(rng.integers(0, 4))):  # specks, sometimes touching the border
            y, x = (int(v) for v in rng.integers(0, side - 2, 2))
            image[y : y + 2, x : x + 2] = 255
        if rng.random() < 0.5:  # a neighbour's stroke from an edge
            depth, start = int(rng.integers(1, side // 4)), int(rng.integers(0, side // 2))
            strip = (slice(0, depth), slice(start, start + int(rng.integers(1, side // 2))))
            image[strip if rng.random() < 0.5 else strip[::-1]] = 255
        image = np.rot90(image, int(rng.integers(0, 4))).copy()
        images.append(image)
    return np.stack(images)


def test_with_a_cell_reference_each_image_is_normalised_alone_whatever_the_batch():
    images = _messy_characters(70, seed=1)
    cell = PreprocessOptions(size_reference="cell")
    together = normalise_characters(images, options=cell)
    alone = np.stack([normalise_characters(image, options=cell)[0] for image in images])
    np.testing.assert_array_equal(together, alone)
    np.testing.assert_array_equal(together, normalise_characters(images, options=cell, batch=7))
    reverse = normalise_characters(images[::-1], options=cell)
    np.testing.assert_array_equal(together[::-1], reverse)


@pytest.mark.parametrize("fit", ["box", "moments"])
def test_with_a_writer_reference_the_batching_and_order_change_nothing(fit):
    images = _messy_characters(70, seed=1)
    writers = np.repeat(["a", "b", "c", "d", "e"], 14)
    options = PreprocessOptions(fit=fit, reference_min_images=10)
    together = normalise_characters(images, options=options, writers=writers)
    batched = normalise_characters(images, options=options, writers=writers, batch=7)
    np.testing.assert_array_equal(together, batched)
    reverse = normalise_characters(images[::-1], options=options, writers=writers[::-1])
    np.testing.assert_array_equal(together[::-1], reverse)


@pytest.mark.parametrize(
    "options",
    [
        PreprocessOptions(),
        PreprocessOptions(fragment_band=0.33, fragment_max_share=0.5),
        PreprocessOptions(fragment_band=0.0),
        PreprocessOptions(min_speck_area=0.0),
        PreprocessOptions(min_speck_area=0.002),  # specks of several cells: labelled path
        PreprocessOptions(remove_border_fragments=False),
    ],
)
def test_clean_up_without_labelling_matches_labelling_every_image(options):
    from hwexp.data.preprocess import _clean_mask, _clean_mask_labelled, _inner, _padded_mask

    rng = np.random.default_rng(2)
    dots = rng.random((40, 64, 64)) < rng.uniform(0.002, 0.2, (40, 1, 1))  # specks, clusters
    small = np.concatenate([_messy_characters(60, side=64, seed=3), dots.astype(np.uint8) * 255])
    small[-1] = 0  # no ink at all
    small[-2] = 0
    small[-2, 30, 30] = 255  # a lone speck: kept, as the image's largest component
    mask = _padded_mask(small, np.full(len(small), 127.0))
    fast = _inner(_clean_mask(mask, options))
    np.testing.assert_array_equal(fast, _clean_mask_labelled(_inner(mask).copy(), options))


def test_levels_match_percentiles():
    from hwexp.data.preprocess import _levels

    rng = np.random.default_rng(4)
    small = rng.integers(0, 256, (50, 40, 40), dtype=np.uint8)
    small[:25] //= 64  # few levels: the darkest and brightest fill their ranks
    small[10:20, :30] = 3
    options = PreprocessOptions()
    low, high = _levels(small, options)
    flat = small.reshape(50, -1)
    last = flat.shape[1] - 1
    expected_low = np.sort(flat, axis=1)[:, round(options.background_percentile / 100 * last)]
    expected_high = np.sort(flat, axis=1)[:, round(options.ink_percentile / 100 * last)]
    np.testing.assert_array_equal(low, expected_low)
    np.testing.assert_array_equal(high, expected_high)


@pytest.mark.parametrize("step, h, w", [(1, 20, 21), (2, 127, 128), (2, 128, 127), (3, 62, 64)])
def test_masking_at_cell_resolution(step, h, w):
    from hwexp.data.preprocess import _masked

    rng = np.random.default_rng(step)
    images = rng.integers(0, 256, (5, h, w), dtype=np.uint8)
    cells = rng.random((5, -(-h // step), -(-w // step))) < 0.5
    full = np.repeat(np.repeat(cells, step, axis=1), step, axis=2)[:, :h, :w]
    np.testing.assert_array_equal(_masked(images, cells, step), np.where(full, images, 0))


def _side(image: np.ndarray) -> int:
    rows, cols = np.nonzero(image >= 128)
    return int(max(np.ptp(rows), np.ptp(cols)) + 1)


def _writer(scale: float, n_full: int = 12) -> np.ndarray:
    """A writer's page: ``n_full`` full-size crosses and one small one (half their size), all
    ``scale`` times a 60 px character in 128 px cells."""
    full = [
        cross(
            size=round(60 * scale * (1 + 0.02 * i)), width=max(2, round(8 * scale)), top=20, left=20
        )
        for i in range(n_full)
    ]
    small = cross(size=round(30 * scale), width=max(2, round(8 * scale)), top=40, left=40)
    return np.stack([*full, small])


def test_a_small_character_stays_small_against_its_writers_others_whatever_their_size():
    # Two writers: one fills its cells, one writes at half that size. Judged against its own
    # writer's median, each small character lands at the same prepared size.
    big, tiny = _writer(1.6), _writer(0.8)
    images = np.concatenate([big, tiny])
    writers = np.repeat(["big", "tiny"], len(big))
    out = normalise_characters(images, writers=writers)
    sides = [_side(image) for image in out]
    n = len(big)
    assert sides[n - 1] < 0.7 * sides[0]  # the small cross is smaller than the full-size ones
    assert abs(sides[n - 1] - sides[2 * n - 1]) <= 1  # the same for both writers
    assert abs(sides[0] - sides[n]) <= 1
    # Against the cell, the writer at half size has every character shrunk.
    cell = normalise_characters(images, options=PreprocessOptions(size_reference="cell"))
    assert _side(cell[n]) < 0.8 * _side(cell[0])


def test_writers_with_few_images_share_a_pooled_reference_and_lone_images_use_the_cell():
    page = _writer(1.0, n_full=5)  # 6 images: fewer than reference_min_images (12)
    images = np.concatenate([page, page])
    writers = np.array([f"w{i}" for i in range(len(images))])  # each image its own writer
    options = PreprocessOptions()
    pooled = normalise_characters(images, options=options, writers=writers)
    from hwexp.data.preprocess import _fit_batch, reference_extents

    fit = _fit_batch(images, options)
    refs = reference_extents(fit.extent, fit.has_ink, 128, writers, options)
    np.testing.assert_allclose(refs, np.median(fit.extent.max(axis=1)))
    lone = reference_extents(fit.extent[:1], fit.has_ink[:1], 128, writers[:1], options)
    assert lone[0] == options.reference_fill * 128
    alone = normalise_characters(images[-1], options=options)[0]
    assert _side(alone) != _side(pooled[-1])  # the small cross: cell fallback vs pooled median


def test_a_stray_mark_moves_the_box_fit_but_barely_the_moment_fit():
    from scipy import ndimage

    def character_side(image: np.ndarray) -> int:  # the largest component: the cross
        labels, _ = ndimage.label(image >= 128)
        largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
        return _side(np.where(labels == largest, 255, 0))

    clean = cross(top=30, left=30, size=60)
    marked = clean.copy()
    marked[110:114, 118:122] = 255  # a mark far from the character, too large for a speck
    sides = {}
    for fit in ("moments", "box"):
        options = PreprocessOptions(fit=fit, size_reference="cell", remove_border_fragments=False)
        a, b = normalise_characters(np.stack([clean, marked]), options=options)
        sides[fit] = character_side(a) - character_side(b)
    assert sides["box"] > 5  # the box stretches to the mark: the character shrinks
    assert abs(sides["moments"]) <= 1


def test_redrawn_strokes_have_one_width_whatever_the_pen():
    thin, thick = cross(width=4, size=70), cross(width=14, size=70)
    options = PreprocessOptions(stroke_width=0.06)
    out = normalise_characters(np.stack([thin, thick]), options=options)
    ink = (out >= 128).sum(axis=(1, 2))
    assert abs(int(ink[0]) - int(ink[1])) <= 0.1 * ink.max()
    plain = normalise_characters(np.stack([thin, thick]))
    plain_ink = (plain >= 128).sum(axis=(1, 2))
    assert plain_ink[1] > 2 * plain_ink[0]
