"""A/B of renderer options: train each arm on synthetic data over several seeds, read fonts
and, with ``--proxy``, the real-handwriting proxy.

Each arm is a name and Hydra overrides. For every arm and seed, ``python -m hwexp`` trains in
its own ``HWEXP_ROOT`` (``OUT/ARM-sSEED``), then ``eval_fonts.py`` reads Debian's held-out
handwriting and brush fonts with that model, and ``real_proxy.py eval`` reads every set of the
proxy built with ``real_proxy.py build`` (its figures, not the fonts', predict real scans).
The seed also changes the writer split and every writer's draws, so one seed's difference is
mostly noise (about a point on hiragana): compare means and the per-seed paired differences
against the first arm. A run's own test split is small (1,200 images for hiragana75 at 160
writers: one image is 0.08 points); ``--held-out N`` also reads every model on N writers that
no arm trains on (writer seeds from 1000; 320 writers are 24,000 images, prepared once and
shared), which resolves differences of a tenth of a point.

    python scripts/ab_synth.py --out /tmp/ab --seeds 1 2 3 \\
        --arm base \\
        --arm debian synthetic=debian_fonts \\
        --arm debian_r50 synthetic=debian_fonts synthetic.font_ratio=0.5 \\
        [--common dataset.classes=hiragana75 --common trainer.epochs=12 ...] [--proxy DIR] \\
        [--held-out 320]

Finished runs are kept (``result.json``) and reused when the script is run again with the
same arm and overrides, so a long comparison can be resumed or extended by seeds or arms.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir

from hwexp import CONF_DIR
from hwexp.fsutil import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
DEFAULT_COMMON = ("dataset.classes=hiragana75", "synthetic.writers=80", "trainer.epochs=12")
HELD_OUT_FIRST_WRITER = 1000  # beyond any arm's training writers (0 .. synthetic.writers - 1)


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: tuple[str, ...]


def run_arm_seed(
    arm: Arm,
    seed: int,
    common: tuple[str, ...],
    out: Path,
    proxy: Path | None = None,
    held_out: int = 0,
) -> dict:
    """Train and read fonts (and the proxy, and ``held_out`` held-out synthetic writers) for
    one arm and seed, or reuse a finished result (reading what it lacks); the figures."""
    root = out / f"{arm.name}-s{seed}"
    spec = {"arm": arm.name, "seed": seed, "overrides": [*common, *arm.overrides]}
    spec_file, result_file = root / "arm.json", root / "result.json"
    if spec_file.exists():
        if json.loads(spec_file.read_text()) != spec:
            raise SystemExit(
                f"{root} holds a run of other overrides ({spec_file}); remove it or use another "
                "--out or arm name"
            )
        if result_file.exists():
            result = json.loads(result_file.read_text())
            if _read_missing(result, root, spec["overrides"], out, proxy, held_out):
                atomic_write_text(result_file, json.dumps(result, indent=1, ensure_ascii=False))
            return result
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(spec_file, json.dumps(spec, indent=1) + "\n")
    env = {**os.environ, "HWEXP_ROOT": str(root)}
    train = [sys.executable, "-m", "hwexp", f"seed={seed}", *spec["overrides"]]
    start = time.perf_counter()
    _logged(train, root / "train.log", env)
    wall = time.perf_counter() - start
    read = [
        sys.executable,
        str(REPO / "scripts" / "eval_fonts.py"),
        "--run",
        "best",
        "--mlruns",
        str(root / "mlruns"),
        "--out",
        str(root),
        "--json",
        str(root / "fonts.json"),
    ]
    _logged(read, root / "eval.log", env)
    result = {**json.loads((root / "fonts.json").read_text()), "train_seconds": wall}
    _read_missing(result, root, spec["overrides"], out, proxy, held_out)
    atomic_write_text(result_file, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return result


def _read_missing(
    result: dict, root: Path, overrides: list[str], out: Path, proxy: Path | None, held_out: int
) -> bool:
    """Add the proxy's and the held-out writers' figures that ``result`` lacks; whether any."""
    added = False
    if proxy is not None and "proxy" not in result:
        result["proxy"] = _read_proxy(root, proxy)
        added = True
    if held_out and result.get("held_out", {}).get("writers") != held_out:
        result["held_out"] = _read_held_out(root, overrides, out, held_out)
        added = True
    return added


def _read_proxy(root: Path, proxy: Path) -> dict:
    figures = root / "proxy.json"
    read = [sys.executable, str(REPO / "scripts" / "real_proxy.py"), "eval", "--proxy"]
    read += [str(proxy), "--run", "best", "--json", str(figures)]
    _logged(read, root / "proxy.log", {**os.environ, "HWEXP_ROOT": str(root)})
    return json.loads(figures.read_text())


def _read_held_out(root: Path, overrides: list[str], out: Path, writers: int) -> dict:
    """The run's accuracy on ``writers`` synthetic writers from HELD_OUT_FIRST_WRITER, of the
    class set its ``overrides`` name; their images are prepared once for every arm in ``out``."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        synthetic = compose("config", overrides=list(overrides)).synthetic  # the arm's own
    trained = int(synthetic.first_writer) + int(synthetic.writers)
    if trained > HELD_OUT_FIRST_WRITER:
        raise SystemExit(
            f"--held-out: {root.name} trains on writer seeds up to {trained - 1}, into the "
            f"held-out writers from {HELD_OUT_FIRST_WRITER}; train on fewer writers"
        )
    classes = [o for o in overrides if o.startswith("dataset.classes=")]
    read = [sys.executable, "-m", "hwexp.evaluate", "run=best", "part=all", *classes]
    read += [f"synthetic.first_writer={HELD_OUT_FIRST_WRITER}", f"synthetic.writers={writers}"]
    read += [f"paths.cache_dir={out / 'held-out-cache'}"]
    log = root / "held_out.log"
    _logged(read, log, {**os.environ, "HWEXP_ROOT": str(root)})
    return {"writers": writers, "accuracy": parse_evaluation(log.read_text(errors="replace"))}


def parse_evaluation(output: str) -> float:
    """The accuracy in ``python -m hwexp.evaluate``'s headline (``... accuracy 0.9832, ...``)."""
    found = re.search(r"^run \S+ on .*\): accuracy ([0-9.]+),", output, re.MULTILINE)
    if found is None:
        raise SystemExit(f"no accuracy line in hwexp.evaluate's output:\n{output[-2000:]}")
    return float(found[1])


def _logged(command: list[str], log: Path, env: dict[str, str]) -> None:
    print("  $", " ".join(command), f"> {log}", flush=True)
    with log.open("w") as f:
        done = subprocess.run(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise SystemExit(f"exit {done.returncode} from {command[1:3]}; see {log}:\n{tail}")


# (column, where in a result): accuracies, shown in percent.
FIGURES = (
    ("synthetic test", ("test_accuracy",)),
    ("fonts plain", ("fonts", "plain")),
    ("fonts distorted", ("fonts", "distorted")),
    ("handwriting fonts distorted", ("groups", "handwriting", "distorted")),
    ("brush fonts distorted", ("groups", "brush", "distorted")),
)


PROXY_SETS = ("etl8b2", "etl9g", "scans")


HELD_OUT = ("held-out synthetic", ("held_out", "accuracy"))


def _columns(results: dict) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """FIGURES, plus the held-out writers and the proxy's sets when every result has them."""
    columns = FIGURES
    if all("held_out" in r for r in results.values()):
        columns = (FIGURES[0], HELD_OUT, *FIGURES[1:])
    if all("proxy" in r for r in results.values()):
        columns += tuple((f"proxy {s}", ("proxy", s, "accuracy")) for s in PROXY_SETS)
    return columns


def _cell(name: str, value: float, signed: bool = False) -> str:
    """A figure in percent: the held-out writers (tens of thousands of images) to 0.01."""
    return format(value, f"{'+' if signed else ''}.{2 if name == HELD_OUT[0] else 1}f")


def _figures(result: dict, columns=FIGURES) -> list[float]:
    values = []
    for _, keys in columns:
        value = result
        for key in keys:
            value = value[key]
        values.append(100 * value)
    return values


def summary_rows(arms: list[Arm], seeds: list[int], results: dict) -> list[str]:
    """Markdown lines: one row per arm and seed; then per arm the mean of each figure and,
    after the first arm, the mean (min..max) per-seed paired difference to it, in points."""
    chosen = _columns({key: results[key] for key in results})
    names = [name for name, _ in chosen]
    proxy = any(name.startswith("proxy") for name in names)
    size_column = " proxy full→small / small→full |" if proxy else ""
    lines = [
        f"| arm | seed | {' | '.join(names)} | voicing / size / other errors, distorted "
        f"|{size_column} train s |",
        "|---|---|" + "---|" * (len(names) + 2 + proxy),
    ]
    for arm in arms:
        for seed in seeds:
            r = results[arm.name, seed]
            e = r["errors"]["distorted"]
            kinds = f"{e['voicing mark']} / {e['small/full size']} / {e['other']}"
            if proxy:
                full_small = sum(r["proxy"][s]["full_to_small"] for s in PROXY_SETS)
                small_full = sum(r["proxy"][s]["small_to_full"] for s in PROXY_SETS)
                kinds += f" | {full_small} / {small_full}"
            cells = " | ".join(_cell(n, v) for n, v in zip(names, _figures(r, chosen), strict=True))
            lines.append(f"| {arm.name} | {seed} | {cells} | {kinds} | {r['train_seconds']:.0f} |")
    lines += ["", f"| arm | {' | '.join(names)} |", "|---|" + "---|" * len(names)]
    # columns[arm][figure] = that figure over the seeds
    columns = {
        arm.name: list(zip(*(_figures(results[arm.name, s], chosen) for s in seeds), strict=True))
        for arm in arms
    }
    base = columns[arms[0].name]
    for arm in arms:
        cells = []
        for name, column, base_column in zip(names, columns[arm.name], base, strict=True):
            cell = _cell(name, statistics.fmean(column))
            if arm is not arms[0]:
                d = [v - b for v, b in zip(column, base_column, strict=True)]
                mean, low, high = (
                    _cell(name, x, signed=True) for x in (statistics.fmean(d), min(d), max(d))
                )
                cell += f" ({mean}, {low}..{high})"
            cells.append(cell)
        lines.append(f"| {arm.name} | {' | '.join(cells)} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--arm",
        nargs="+",
        action="append",
        required=True,
        metavar=("NAME", "OVERRIDE"),
        help="an arm's name, then its Hydra overrides (none: the defaults); repeatable",
    )
    parser.add_argument(
        "--common",
        action="append",
        default=None,
        help=f"an override for every arm, repeatable (default: {' '.join(DEFAULT_COMMON)})",
    )
    parser.add_argument(
        "--proxy", type=Path, default=None, help="also read this real_proxy.py build folder"
    )
    parser.add_argument(
        "--held-out",
        type=int,
        default=0,
        metavar="WRITERS",
        help=f"also read this many synthetic writers from seed {HELD_OUT_FIRST_WRITER} on, "
        "that no arm trains on (320: 24,000 hiragana75 images)",
    )
    args = parser.parse_args()
    arms = [Arm(a[0], tuple(a[1:])) for a in args.arm]
    if len({a.name for a in arms}) != len(arms):
        parser.error("arm names must differ")
    common = tuple(args.common) if args.common is not None else DEFAULT_COMMON
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    print(f"code {commit}; common overrides: {' '.join(common)}")
    results = {}
    # Seed-major order: an interrupted comparison has every arm at the first seeds.
    for seed in args.seeds:
        for arm in arms:
            print(f"{arm.name}, seed {seed}:", " ".join(arm.overrides) or "(defaults)", flush=True)
            results[arm.name, seed] = run_arm_seed(
                arm, seed, common, args.out, args.proxy, args.held_out
            )
    print("\n".join(summary_rows(arms, args.seeds, results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
