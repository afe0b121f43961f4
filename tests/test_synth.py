"""The built-in synthetic handwriting source (hwexp.synth)."""

from __future__ import annotations

import dataclasses
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from hwexp import CONF_DIR
from hwexp.data.charsets import CLASS_SETS
from hwexp.data.sources import renderer_settings
from hwexp.errors import DataError
from hwexp.synth import (
    MissingCharacters,
    SynthOptions,
    font_coverage,
    missing_characters,
    render,
    render_writer,
    writer_kind,
)
from hwexp.synth.fonts import FontUnavailable, is_held_out, parse_fc_list, resolve_fonts
from hwexp.synth.kanjivg import load_glyph, parse_path
from hwexp.synth.render import voicing_mark_strokes
from hwexp.synth.style import WriterStyle
from scripts_loader import load_script

ROOT = Path(__file__).resolve().parents[1]
CLEAN = {"fragment_prob": 0.0, "speck_prob": 0.0}  # no neighbours' fragments, no specks


def _seed_of_kind(kind: str, ratio: float, start: int = 0) -> int:
    return next(s for s in range(start, start + 1000) if writer_kind(s, ratio) == kind)


def _ink_mask(image: np.ndarray) -> np.ndarray:
    """Pixels clearly brighter than the cell's background (median)."""
    image = image.astype(np.float32)
    background, peak = np.median(image), image.max()
    return image > background + 0.5 * (peak - background)


def _normalised(image: np.ndarray, side: int = 32) -> np.ndarray:
    """Crop to the ink and resize to ``side`` x ``side`` (float in [0, 1]), aspect kept."""
    mask = _ink_mask(image)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    half = max(y1 - y0, x1 - x0) / 2
    pad = mask.shape[0]  # so that the square box never leaves the image
    cy, cx = (y0 + y1) / 2 + pad, (x0 + x1) / 2 + pad
    box = (cx - half, cy - half, cx + half, cy + half)
    grey = Image.fromarray(np.pad(np.where(mask, 255, 0).astype(np.uint8), pad))
    return np.asarray(grey.resize((side, side), Image.Resampling.BILINEAR, box=box)) / 255.0


# --- contract ---------------------------------------------------------------------------------


def test_chunk_contract_and_ink_high():
    chars = list("あいアイ日")
    chunk = render_writer(chars, 3, SynthOptions())
    assert chunk.images.shape == (5, 128, 128) and chunk.images.dtype == np.uint8
    assert list(chunk.labels) == chars
    assert set(chunk.writers) == {"synthetic:3"}
    assert chunk.ink == "high"
    assert set(chunk.meta) == {"writer_kind", "font"}
    for image in chunk.images:
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert np.median(border) < 80  # dark background
        assert image.max() >= np.median(image) + 60  # bright ink


def test_same_seed_same_pixels_and_seeds_differ():
    options = SynthOptions.from_config({"font_ratio": 0.5})
    chars = list("あかさ") + ["あ"]
    for kind in ("kanjivg", "font"):
        seed = _seed_of_kind(kind, 0.5)
        first = render_writer(chars, seed, options)
        again = render_writer(chars, seed, SynthOptions.from_config({"font_ratio": 0.5}))
        np.testing.assert_array_equal(first.images, again.images)
        assert set(first.meta["writer_kind"]) == {kind}
        other = render_writer(chars, seed + 1000, options)
        assert np.abs(first.images.astype(int) - other.images).mean() > 3
    # A character's pixels do not depend on what else is rendered in the same call.
    alone = render_writer(["か"], 11, options).images[0]
    np.testing.assert_array_equal(alone, render_writer(list("あかさ"), 11, options).images[1])


def test_options_change_pixels():
    a = render_writer(["あ"], 5, SynthOptions()).images[0]
    b = render_writer(["あ"], 5, SynthOptions(blur_px=(2.0, 2.0))).images[0]
    assert not np.array_equal(a, b)


def test_writer_kind_follows_ratio_and_is_nested():
    seeds = range(2000)
    low = {s for s in seeds if writer_kind(s, 0.1) == "font"}
    high = {s for s in seeds if writer_kind(s, 0.3) == "font"}
    assert abs(len(low) / 2000 - 0.1) < 0.03 and abs(len(high) / 2000 - 0.3) < 0.04
    assert low <= high  # raising the ratio only turns KanjiVG writers into font writers
    assert not any(writer_kind(s, 0.0) == "font" for s in seeds)
    with pytest.raises(ValueError, match=">= 0"):
        writer_kind(-1, 0.5)


# --- coverage of class sets ---------------------------------------------------------------------


def _assert_ink_inside(chunk, min_pixels: int = 25) -> None:
    for label, image in zip(chunk.labels, chunk.images, strict=True):
        mask = _ink_mask(image)
        assert mask.sum() >= min_pixels, f"{label}: almost no ink"
        edge = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
        assert not edge.any(), f"{label}: ink touches the cell border"


@pytest.mark.parametrize("kind", ["kanjivg", "font"])
def test_every_kana_class_renders_ink_inside_the_frame(kind):
    options = SynthOptions.from_config({**CLEAN, "font_ratio": 0.5})
    chars = list(CLASS_SETS["hiragana75"]) + list(CLASS_SETS["katakana48"])
    chunk = render_writer(chars, _seed_of_kind(kind, 0.5, start=20), options)
    assert set(chunk.meta["writer_kind"]) == {kind}
    _assert_ink_inside(chunk)


def test_kanji_sample_renders_ink_inside_the_frame():
    rng = np.random.default_rng(0)
    pool = sorted(set(CLASS_SETS["kanji881"]) | set(CLASS_SETS["etl9_3036"]))
    chars = list(rng.choice(pool, 40, replace=False)) + ["鬱", "驚"]
    _assert_ink_inside(render_writer(chars, 4, SynthOptions.from_config(CLEAN)))


@pytest.mark.slow
def test_all_etl_kanji_and_kana_render():
    chars = sorted(set(CLASS_SETS["etl9_3036"]) | set(CLASS_SETS["kanji881"]))
    options = SynthOptions.from_config({**CLEAN, "font_ratio": 0.5})
    for kind in ("kanjivg", "font"):
        _assert_ink_inside(render_writer(chars, _seed_of_kind(kind, 0.5, start=50), options))


# --- variation --------------------------------------------------------------------------------


def test_writers_differ_more_than_one_writer_repeating_itself():
    """Two images of a class by one writer are closer than images by two different writers."""
    options = SynthOptions.from_config(CLEAN)
    chars = list("あきすなぬはまやるを")
    writers = range(30, 38)
    shapes = {
        w: render_writer([c for c in chars for _ in (0, 1)], w, options).images for w in writers
    }
    norm = {w: [_normalised(im) for im in ims] for w, ims in shapes.items()}
    within, between = [], []
    for i in range(len(chars)):
        for w in writers:
            within.append(np.abs(norm[w][2 * i] - norm[w][2 * i + 1]).mean())
            between.append(
                np.abs(norm[w][2 * i] - norm[w + 1 if w + 1 in norm else 30][2 * i]).mean()
            )
    within_mean, between_mean = float(np.mean(within)), float(np.mean(between))
    assert between_mean > 0.12, between_mean  # writers really differ (ink shares ~0.2-0.4)
    assert within_mean < 0.8 * between_mean, (within_mean, between_mean)
    assert within_mean > 0.01  # and a writer does not repeat a character pixel for pixel


def test_voicing_marks_are_found_for_every_voiced_kana():
    chars = set().union(*(CLASS_SETS[name] for name in ("hiragana75", "etl9_3036", "k49")))
    expected = {
        c: {"\u3099": 2, "\u309a": 1}.get(unicodedata.normalize("NFD", c)[-1], 0) for c in chars
    }
    assert sum(n > 0 for n in expected.values()) == 25  # が..ぽ (ETL8 hiragana has no ゔ)
    found = {c: voicing_mark_strokes(load_glyph(c)) for c in chars}
    assert found == expected


class _NoJitter(render._Mix):
    """Per-character and per-image draws at their mean: only the writer's habit acts."""

    def __init__(self) -> None:
        super().__init__(np.random.default_rng(0), np.random.default_rng(1), 0.5)

    def normal(self, shape=()):
        return np.zeros(shape)


@pytest.mark.parametrize("char", ["で", "ぱ"])
def test_voicing_mark_habit_resizes_and_moves_only_the_mark(char):
    glyph = load_glyph(char)
    geo = render._geom(char)
    style = dataclasses.replace(
        WriterStyle.from_seed(3),
        mark_scale=1.3,
        mark_shift=(2.0, -1.0),
        mark_rotation=0.0,
        mark_spread=1.0,
    )
    pts = glyph.points.copy()
    render._vary_marks(pts, glyph, geo, style, _NoJitter())
    first = glyph.offsets[-geo.marks - 1]
    np.testing.assert_array_equal(pts[:first], glyph.points[:first])  # the base is untouched
    before, after = glyph.points[first:], pts[first:]
    np.testing.assert_allclose(after.mean(axis=0), before.mean(axis=0) + [2.0, -1.0])
    np.testing.assert_allclose(np.ptp(after, axis=0), 1.3 * np.ptp(before, axis=0))


def test_voicing_marks_vary_between_writers():
    """The mark's size relative to the base character changes from writer to writer."""
    ratios = []
    for seed in range(40, 60):
        style = WriterStyle.from_seed(seed)
        glyph, geo = load_glyph("ぱ"), render._geom("ぱ")
        pts = glyph.points.copy()
        render._vary_marks(pts, glyph, geo, style, _NoJitter())
        first = glyph.offsets[-1 - geo.marks]
        ratios.append(
            np.ptp(pts[first:], axis=0).max() / np.ptp(glyph.points[first:], axis=0).max()
        )
    assert max(ratios) / min(ratios) > 1.5, ratios


def test_writer_styles_cover_pens_and_scans():
    styles = [WriterStyle.from_seed(s) for s in range(300)]
    assert {s.pen for s in styles} == {"pencil", "ballpoint", "felt", "brush", "finger"}
    assert {s.scan for s in styles} == {"8bit", "4bit", "1bit"}
    widths = [s.width_px for s in styles]
    assert max(widths) > 2.5 * min(widths)


def test_scan_modes_quantise_grey_levels():
    for scan, levels in (("4bit", set(range(0, 256, 17))), ("1bit", {0, 255})):
        options = SynthOptions(scan_weights=((scan, 1.0),))
        # finger writers draw on a phone: never scanned
        seed = next(s for s in range(100) if WriterStyle.from_seed(s, options).pen != "finger")
        chunk = render_writer(list("あいう"), seed, options)
        assert set(np.unique(chunk.images)) <= levels, scan


def test_border_fragments_appear_when_asked():
    options = SynthOptions(fragment_prob=1.0, max_fragments=2, speck_prob=0.0)
    chunk = render_writer(list("あいうえおかきくけこ"), 2, options)
    edges = [_ink_mask(im)[[0, -1]].any() or _ink_mask(im)[:, [0, -1]].any() for im in chunk.images]
    assert sum(edges) >= 7  # most cells now have ink reaching the border
    _assert_ink_inside(render_writer(list("あいうえおかきくけこ"), 2, SynthOptions(**CLEAN)))


# --- missing characters and fonts -------------------------------------------------------------


def test_missing_characters_are_named():
    assert missing_characters(["あ", "😀", "𠀋", "あ"]) == ["😀", "𠀋"]
    with pytest.raises(MissingCharacters, match="U\\+1F600") as error:
        render_writer(["あ", "😀"], 0, SynthOptions())
    assert isinstance(error.value, DataError) and error.value.chars == ["😀"]


def test_font_coverage_reports_missing_glyphs():
    coverage = font_coverage(["あ", "😀", "日"])
    assert coverage == {"ipaexg": ["😀"], "NotoSansCJKjp-Regular": ["😀"]}


def test_font_writer_falls_back_to_strokes_for_glyphs_its_font_lacks():
    options = SynthOptions(font_ratio=1.0)
    chunk = render_writer(["あ", "𧒑"], 0, options)  # no default font has U+27491
    assert list(chunk.meta["writer_kind"]) == ["font", "kanjivg"]
    assert chunk.meta["font"][0] in {f.name for f in resolve_fonts(options.fonts)}
    assert chunk.meta["font"][1] == ""


def test_held_out_fonts_are_refused(tmp_path):
    source = resolve_fonts(("japanize-matplotlib",))[0].path
    klee = tmp_path / "KleeOne-Regular.ttf"
    shutil.copy(source, klee)
    with pytest.raises(FontUnavailable, match="held out"):
        resolve_fonts((str(klee),))
    for path in (
        "/usr/share/fonts/truetype/seto/setofont.ttf",
        "/usr/share/fonts/truetype/kouzan-mouhitsu/KouzanBrushFontSousyo.ttf",
        "/usr/share/fonts/truetype/aoyagi-soseki/aoyagi-soseki.ttf",
    ):
        assert is_held_out(path)
    assert not is_held_out(source)
    # System fonts: held-out files are dropped, also behind an alternatives-style link.
    (tmp_path / "seto").mkdir()
    seto = tmp_path / "seto" / "setofont.ttf"
    shutil.copy(source, seto)
    (tmp_path / "fonts-japanese-gothic.ttf").symlink_to(seto)
    listing = f"{source}\t0\n{seto}\t0\n{tmp_path / 'fonts-japanese-gothic.ttf'}\t0\n"
    assert [f.path for f in parse_fc_list(listing)] == [source]
    with pytest.raises(FontUnavailable, match="not installed"):
        resolve_fonts(("no-such-font-package-xyz",))


def test_one_font_file_of_a_distribution_is_chosen_by_name(tmp_path, monkeypatch):
    (face,) = resolve_fonts(("japanize-matplotlib:ipaexg.ttf",))
    assert face.name == "ipaexg" and face.path == resolve_fonts(("japanize-matplotlib",))[0].path
    with pytest.raises(FontUnavailable, match=r"no font file 'missing\.ttf'.*ipaexg\.ttf"):
        resolve_fonts(("japanize-matplotlib:missing.ttf",))
    with pytest.raises(FontUnavailable, match=r"'/no/such\.ttf' .*does not exist.*remove"):
        resolve_fonts(("/no/such.ttf",))
    # A file that exists under a name of that shape is a path, not a distribution entry.
    shutil.copy(face.path, tmp_path / "a:b.ttf")
    monkeypatch.chdir(tmp_path)
    assert resolve_fonts(("a:b.ttf",))[0].path == str((tmp_path / "a:b.ttf").resolve())


# --- geometry and options ---------------------------------------------------------------------


def test_parse_path_absolute_relative_and_smooth_curves():
    line = parse_path("M10,10 L20,10")
    np.testing.assert_allclose(line[[0, -1]], [[10, 10], [20, 10]])
    rel = parse_path("m10,10c0,0 10,0 10,0s10,5 10,10")
    np.testing.assert_allclose(rel[-1], [30, 20])
    assert parse_path("M1-2.5.5.5")[-1].tolist() == [0.5, 0.5]  # packed numbers, implicit L
    glyph = load_glyph("あ")
    assert glyph.n_strokes == 3
    assert glyph.points.min() > 0 and glyph.points.max() < 109
    steps = np.linalg.norm(np.diff(glyph.strokes()[2], axis=0), axis=1)
    assert steps.max() < 1.2  # resampled at about one frame unit


def test_from_config_rejects_unknown_keys_and_parses_yaml():
    with pytest.raises(ValueError, match="bogus_knob"):
        SynthOptions.from_config({"bogus_knob": 1, "canvas_size": 64})
    with pytest.raises(ValueError, match="slant_deg"):
        SynthOptions.from_config({"slant_deg": [5, -5]})
    cfg = yaml.safe_load((Path(CONF_DIR) / "synthetic" / "default.yaml").read_text())
    assert SynthOptions.from_config(renderer_settings(cfg)) == SynthOptions()
    small = SynthOptions.from_config({"canvas_size": 64, "pen_weights": {"finger": 1}})
    chunk = render_writer(["あ"], 0, small)
    assert chunk.images.shape == (1, 64, 64)


def test_show_synth_script_writes_a_grid(tmp_path, monkeypatch):
    module = load_script("show_synth", monkeypatch)
    out = tmp_path / "grid.png"
    assert module.main([str(out), "--chars", "あい", "--writers", "0-2"]) == 0
    assert Image.open(out).size == (2 * 128, 3 * 128)
