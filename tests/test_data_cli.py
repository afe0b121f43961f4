from PIL import Image

from data_config import run_module
from etl_fixtures import make_etl8g_tree
from hwexp.data.download import ENV_KMNIST_BASE_URL
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
    assert grid.size == (5 * 48, 3 * 48)
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
