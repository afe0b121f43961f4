"""scripts/real_proxy.py: the proxy's cells look like the real sets' and its figures add up."""

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from scripts_loader import load_script


def _ink_share(path) -> float:
    """The ink box's larger side as a share of the cell's larger side, counting components of
    at least 5 % of the largest, as ``shared/real-cells.json`` measures the real cells."""
    grey = np.asarray(Image.open(path).convert("L"), np.float32)
    labels, _ = ndimage.label(grey < (np.median(grey) + grey.min()) / 2, np.ones((3, 3)))
    areas = np.bincount(labels.ravel())
    areas[0] = 0
    rows, cols = np.nonzero(areas[labels] >= 0.05 * areas.max())
    return max(np.ptp(rows), np.ptp(cols)) / max(grey.shape)


def test_built_cells_have_each_real_sets_shape_and_size_in_the_box(tmp_path, monkeypatch):
    proxy = load_script("real_proxy", monkeypatch)
    counts = proxy.build(tmp_path, list("あいつっ"), writers=3, seed=1, fonts=())
    assert counts == {name: 12 for name in proxy.SETS}
    shares = {}
    for name, style in proxy.SETS.items():
        files = sorted((tmp_path / name).glob("*/*.*"))
        assert len(files) == 12
        for path in files:
            image = Image.open(path)
            assert (image.height, image.width) == style.shape, path
            if style.binary:
                assert set(np.unique(np.asarray(image.convert("L")))) <= {0, 255}
        shares[name] = np.median([_ink_share(p) for p in files if p.parent.name in "あい"])
    # ETL8B2-like cells are filled, ETL9G-like ones half empty, the scans in between.
    assert shares["etl9g"] < shares["scans"] < shares["etl8b2"]
    assert 0.4 < shares["etl9g"] < 0.75 and shares["etl8b2"] > 0.8
    small = np.median([_ink_share(p) for p in (tmp_path / "scans" / "っ").iterdir()])
    full = np.median([_ink_share(p) for p in (tmp_path / "scans" / "つ").iterdir()])
    assert small < 0.85 * full


def test_confusion_figures_count_small_and_full_size_both_ways(monkeypatch):
    proxy = load_script("real_proxy", monkeypatch)
    classes = ("あ", "つ", "っ", "や", "ゃ")
    true = ["つ", "つ", "っ", "や", "あ", "あ", "あ", "ゃ"]
    said = ["っ", "つ", "つ", "ゃ", "ゃ", "あ", "ゃ", "ゃ"]
    index = {c: i for i, c in enumerate(classes)}
    hands = np.array(["font"] * 4 + ["kanjivg"] * 4)
    figures = proxy.confusion_figures(
        classes, np.array([index[c] for c in true]), np.array([index[c] for c in said]), hands
    )
    assert figures["errors"] == 5 and figures["accuracy"] == 3 / 8
    assert (figures["full_to_small"], figures["small_to_full"]) == (2, 1)
    assert figures["catch_all"] == {"class": "ゃ", "errors_collected": 3}
    assert figures["by_hand"] == {"font": 0.25, "kanjivg": 0.5}
    assert figures["basic46_accuracy"] == pytest.approx(2 / 6)  # っ, ゃ are not basic
