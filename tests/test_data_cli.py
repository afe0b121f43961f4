from pathlib import Path

import numpy as np
from PIL import Image

from data_config import error_lines, run_module
from etl_fixtures import make_etl8g_tree
from hwexp.data.cache import PreparedSource
from hwexp.data.download import ENV_KMNIST_BASE_URL
from hwexp.data.show import count_table, sample_grid
from test_download import fake_kmnist_files


def run_cli(root, *args):
    return run_module(root, "hwexp.data", *args, timeout=300)


def test_prepare_stats_show(tmp_path):
    make_etl8g_tree(tmp_path / "data" / "raw", "あいう")
    base = ["dataset=hiragana", "dataset.classes='chars:あいう'", "workers=1"]
    prepared = run_cli(tmp_path, "prepare", *base)
    assert prepared.returncode == 0, prepared.stderr
    assert "etl8g: 96 images (48, 48)" in prepared.stdout

    stats = run_cli(tmp_path, "stats", *base)
    assert stats.returncode == 0, stats.stderr
    assert "96 samples, 3 classes, 32 writers" in stats.stdout
    assert "あ      32" in stats.stdout
    assert "test:" in stats.stdout and "writers" in stats.stdout

    output = tmp_path / "grid.png"
    shown = run_cli(tmp_path, "show", *base, f"show.output={output}", "show.per_class=4")
    assert shown.returncode == 0, shown.stderr
    grid = Image.open(output)
    assert grid.width == 5 * 48 and grid.height > 3 * 48  # title and writer ids: see below
    test_only = tmp_path / "grid-test.png"
    shown = run_cli(tmp_path, "show", *base, f"show.output={test_only}", "show.split=test")
    assert shown.returncode == 0, shown.stderr
    assert np.asarray(Image.open(test_only)).tolist() != np.asarray(grid).tolist()
    (line,) = error_lines(run_cli(tmp_path, "show", *base, "show.split=tests"))
    assert line.startswith("error: show.split=tests: choose train, val, test or null")
    assert not (tmp_path / "outputs").exists()  # data commands leave no Hydra folders


def test_missing_files_exit_1_with_message(tmp_path):
    result = run_cli(tmp_path, "prepare", "dataset=kanji3036")
    assert result.returncode == 1
    assert "ETL9G files missing" in result.stderr
    assert "dataset.source=synthetic" in result.stderr
    assert "Traceback" not in result.stderr


def test_usage_on_unknown_command(tmp_path):
    result = run_cli(tmp_path, "frobnicate")
    assert result.returncode == 2 and "usage" in result.stderr


def test_download_command_verifies_md5_against_a_local_mirror(tmp_path, serve):
    files = fake_kmnist_files(tmp_path)  # cannot match the official md5s
    server = serve({f"kmnist/{name}": data for name, data in files.items()})
    mirror = {ENV_KMNIST_BASE_URL: f"{server.base_url}/kmnist"}
    result = run_module(tmp_path, "hwexp.data", "download", "kmnist", env=mirror, timeout=120)
    assert result.returncode == 1
    assert "md5" in result.stderr and "kmnist-train-imgs.npz" in result.stderr
    assert not (tmp_path / "data" / "raw" / "kmnist" / "kmnist-train-imgs.npz").exists()
    assert server.requests  # it did fetch from the mirror on 127.0.0.1


def test_folder_dataset_without_path_exit_1_saying_how_to_set_it(tmp_path):
    result = run_cli(tmp_path, "prepare", "dataset=folder")
    assert result.returncode == 1
    assert "dataset.path=<directory>" in result.stderr and "None" not in result.stderr
    assert "Traceback" not in result.stderr


def _source(labels: list[str], writers: list[str]) -> PreparedSource:
    images = np.zeros((len(labels), 16, 16), np.uint8)
    images[:, 4:12, 6:10] = 255  # a bar, drawn dark on white
    return PreparedSource(
        "synthetic", images, np.array(labels), np.array(writers), {}, Path("/cache/entry")
    )


def test_sample_grid_has_a_title_and_the_writer_of_each_image():
    source = _source(["あ", "あ", "い"], ["synthetic:17", "synthetic:4", "synthetic:17"])
    args = (source.images, source.labels, source.writers, ("あ", "い"))
    titled = np.asarray(sample_grid(*args, per_class=3, title="hiragana: 3 samples"))
    plain = np.asarray(sample_grid(*args, per_class=3))
    top = titled.shape[0] - plain.shape[0]
    assert top > 0 and (titled[:top] < 128).any()  # the title, above the same grid
    np.testing.assert_array_equal(titled[top:], plain)
    row = plain.shape[0] // 2  # two classes: an image (48 px) and its writer id below, each row
    assert titled.shape[1] == 4 * 48 and row > 48

    def caption(r: int, column: int) -> np.ndarray:
        return plain[r * row + 48 : (r + 1) * row, column * 48 : (column + 1) * 48]

    assert (caption(0, 1) < 128).any() and (caption(0, 2) < 128).any()
    assert (caption(0, 3) == 255).all() and (caption(1, 2) == 255).all()  # no image: no id
    # い's only image is writer 17's: its id matches one of あ's two and differs from the other
    matches = [np.array_equal(caption(1, 1), caption(0, c)) for c in (1, 2)]
    assert sorted(matches) == [False, True]


def test_stats_summarise_a_large_class_set_unless_asked_for_every_class():
    classes = tuple(chr(0x4E00 + i) for i in range(60))
    labels = [c for i, c in enumerate(classes[:58]) for _ in range(i % 7 + 1)]  # 1..7 each
    source = _source(labels, [f"synthetic:{k % 5}" for k in range(len(labels))])
    summary = count_table(source, classes)
    assert len(summary.splitlines()) < 15
    assert "min 0 / 25% 2 / median 4 / 75% 6 / max 7, mean 3.8" in summary
    assert f"fewest: {classes[58]} 0, {classes[59]} 0, {classes[0]} 1, {classes[7]} 1," in summary
    assert f"most: {classes[6]} 7, {classes[13]} 7," in summary
    assert f"classes without samples: 2: {classes[58]}{classes[59]}" in summary
    table = count_table(source, classes, all_classes=True)
    assert f"{classes[6]:<5}  7" in table and f"{classes[59]:<5}  0" in table
    assert len(table.splitlines()) > 60
    small = count_table(_source(["あ", "い", "あ"], ["w1", "w2", "w3"]), ("あ", "い"))
    assert "あ      2" in small and "samples per class" not in small
