"""scripts/bench_scale.py's own logic: the ETL9G files it generates, the memory it measures."""

import sys

import numpy as np

from etl_fixtures import ETL9G_FORMAT, etl_g_bytes
from hwexp.data import etl
from hwexp.data.charsets import ETL9G_3036
from scripts_loader import load_script


def test_generated_records_are_etl9g_that_hwexp_reads(tmp_path, monkeypatch):
    bench = load_script("bench_scale", monkeypatch)
    pool = bench.glyph_pool(6)
    assert pool.shape == (6, 127, 128) and pool.max() == 15  # 4-bit grey levels, ink high
    rng = np.random.default_rng(0)
    path = tmp_path / "ETL9G" / "ETL9G_07"
    path.parent.mkdir()
    path.write_bytes(etl_g_bytes(bench.jittered_records([25, 26], pool, rng), ETL9G_FORMAT))
    assert etl.labels_in_files([path], etl.ETL9G) == set(ETL9G_3036)  # the file-kind check
    chunk = etl.decode_records(path, etl.ETL9G)
    assert chunk.labels.tolist() == list(ETL9G_3036) * 2
    assert set(chunk.writers.tolist()) == {"ETL9G:25", "ETL9G:26"}
    cells = pool.astype(np.int32) * 17
    first = chunk.images[0].astype(np.int32)
    shifted_copy = any(
        np.array_equal(np.roll(cell, (dy, dx), axis=(0, 1)), first)
        for cell in cells
        for dy in range(-4, 5)
        for dx in range(-4, 5)
    )
    assert shifted_copy  # a pool cell moved by up to 4 pixels


def test_memory_of_a_process_tree_is_summed_over_its_processes(monkeypatch):
    bench = load_script("bench_scale", monkeypatch)
    hold = "x = b'1' * 150_000_000; import time; time.sleep(1.5)"  # 150 MB, written
    child = f"c = subprocess.Popen([sys.executable, '-c', {hold!r}])"
    parent = f"import subprocess, sys; {child}; {hold}; c.wait()"
    measured = bench.measured_run([sys.executable, "-c", parent])
    assert measured.memory.processes == 2
    assert measured.memory.peaks["Pss_Anon"] >= 280e6  # both processes' 150 MB
    assert measured.memory.peaks["Rss"] >= measured.memory.peaks["Pss"] >= 280e6
    assert measured.seconds >= 1.5
