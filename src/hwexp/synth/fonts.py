"""Japanese fonts as a second kind of synthetic writer.

A font entry of :attr:`SynthOptions.fonts` is a PyPI distribution name whose files include
``.ttf``/``.otf``/``.ttc`` fonts (every font file of it is used), ``distribution:file`` for one
font file of a distribution (``pylopdf-fonts-jp:NotoSerifJP-Regular.otf``), or a path to a font
file. See :data:`hwexp.synth.options.DEFAULT_FONTS` for the defaults. With
``system_fonts`` the faces listed by ``fc-list :lang=ja`` are added. Fonts held out for
evaluation (Debian's fonts-seto, fonts-klee, fonts-kouzan-mouhitsu, fonts-aoyagi-soseki) are
refused by file name: listing one explicitly raises, system ones are left out.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from hwexp.errors import DataError

FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")
# Matched against the lower-cased full path: the held-out evaluation fonts.
HELD_OUT = re.compile(r"seto|klee|kouzan|aoyagi|soseki")
GLYPH_EM = 96  # pixels per em of cached glyph bitmaps
_GLYPH_PAD = 16  # blank border around the em box in cached bitmaps


class FontUnavailable(DataError):
    """A configured font package or file cannot be found, or is held out for evaluation."""


@dataclass(frozen=True)
class FontFace:
    """One face of one font file; ``name`` is unique among the faces in use."""

    name: str
    path: str
    index: int = 0


def is_held_out(path: str | Path) -> bool:
    """True for the evaluation-only fonts, judged by file path and by the file a link names."""
    if HELD_OUT.search(str(path).lower()):
        return True
    try:
        target = Path(path).resolve()
    except OSError:  # pragma: no cover - unreadable link: judged by its name alone
        return False
    return bool(HELD_OUT.search(str(target).lower()))


# "distribution:file name" (no path separators), as opposed to a path such as C:\\fonts\\x.ttf.
_DIST_FILE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*):([^/\\:]+)$")


def _faces_of_distribution(dist: str, file_name: str | None = None) -> list[FontFace]:
    """The font files of ``dist``; only the one named ``file_name`` if given."""
    try:
        files = importlib.metadata.files(dist)
    except importlib.metadata.PackageNotFoundError as exc:
        raise FontUnavailable(
            f"font package {dist!r} is not installed (pip install {dist}), or remove it from "
            "synthetic.fonts / set synthetic.font_ratio: 0"
        ) from exc
    paths = sorted(str(f.locate()) for f in files or () if str(f).lower().endswith(FONT_SUFFIXES))
    if not paths:
        raise FontUnavailable(f"package {dist!r} ships no .ttf/.otf/.ttc font files")
    if file_name is not None:
        chosen = [p for p in paths if Path(p).name == file_name]
        if not chosen:
            raise FontUnavailable(
                f"package {dist!r} has no font file {file_name!r}; its fonts: "
                f"{[Path(p).name for p in paths]} (synthetic.fonts entry {dist}:{file_name})"
            )
        paths = chosen
    return [FontFace(Path(p).stem, p) for p in paths]


def system_faces() -> list[FontFace]:
    """Japanese faces from ``fc-list :lang=ja`` minus held-out fonts; [] without fontconfig."""
    if shutil.which("fc-list") is None:
        return []
    out = subprocess.run(
        ["fc-list", "-f", "%{file}\t%{index}\n", ":lang=ja"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    ).stdout
    return parse_fc_list(out)


def parse_fc_list(out: str) -> list[FontFace]:
    """Faces from ``fc-list -f '%{file}\\t%{index}\\n'`` output, held-out fonts removed."""
    faces = []
    for line in sorted(set(out.splitlines())):
        path, _, index = line.partition("\t")
        if not path.lower().endswith(FONT_SUFFIXES) or is_held_out(path):
            continue
        i = int(index or 0)
        faces.append(FontFace(Path(path).stem + (f"#{i}" if i else ""), path, i))
    return faces


@lru_cache(maxsize=32)
def resolve_fonts(fonts: tuple[str, ...], system_fonts: bool = False) -> tuple[FontFace, ...]:
    """All faces named by ``fonts`` (distributions or paths) plus system faces, names unique.

    Raises :class:`FontUnavailable` for a missing package/file or an explicitly held-out font.
    """
    faces: list[FontFace] = []
    for entry in fonts:
        dist_file = _DIST_FILE.match(entry)
        if dist_file and not Path(entry).is_file():
            found = _faces_of_distribution(dist_file[1], dist_file[2])
        elif entry.lower().endswith(FONT_SUFFIXES) or "/" in entry:
            if not Path(entry).is_file():
                raise FontUnavailable(
                    f"font file {entry!r} (synthetic.fonts) does not exist: install it (Debian "
                    "fonts: the apt-get line atop conf/synthetic/debian_fonts.yaml) or remove "
                    "the entry"
                )
            found = [FontFace(Path(entry).stem, str(Path(entry).resolve()))]
        else:
            found = _faces_of_distribution(entry)
        for face in found:
            if is_held_out(face.path):
                raise FontUnavailable(
                    f"font {face.path!r} is held out for evaluation and must not be used to train"
                )
        faces.extend(found)
    if system_fonts:
        faces.extend(system_faces())
    unique: dict[str, FontFace] = {}
    seen_files: set[tuple[str, int]] = set()
    for face in faces:
        key = (str(Path(face.path).resolve()), face.index)
        if key in seen_files:
            continue
        seen_files.add(key)
        name = face.name
        suffix = 2
        while name in unique:
            name, suffix = f"{face.name}~{suffix}", suffix + 1
        unique[name] = FontFace(name, face.path, face.index)
    return tuple(unique.values())


@lru_cache(maxsize=64)
def _codepoints(path: str, index: int) -> frozenset[int]:
    try:
        from fontTools.ttLib import TTFont
    except ImportError as exc:  # pragma: no cover - fonttools comes with matplotlib
        raise DataError("font coverage needs 'fonttools': pip install fonttools") from exc
    with TTFont(path, fontNumber=index, lazy=True) as font:
        cmap = font.getBestCmap() or {}
    return frozenset(cmap)


def face_has(face: FontFace, char: str) -> bool:
    return ord(char) in _codepoints(face.path, face.index)


def font_coverage(
    chars: Iterable[str], fonts: Sequence[str | FontFace] | None = None, system_fonts: bool = False
) -> dict[str, list[str]]:
    """Map each face name to the characters of ``chars`` it lacks (first-seen order).

    ``fonts``: distribution names, paths or :class:`FontFace` s; default the PyPI defaults.
    """
    from hwexp.synth.options import DEFAULT_FONTS

    wanted = list(dict.fromkeys(chars))
    given = list(DEFAULT_FONTS if fonts is None else fonts)
    faces = [f for f in given if isinstance(f, FontFace)]
    names = tuple(f for f in given if not isinstance(f, FontFace))
    if names or system_fonts:
        faces += list(resolve_fonts(names, system_fonts))
    return {
        face.name: [c for c in wanted if ord(c) not in _codepoints(face.path, face.index)]
        for face in faces
    }


@lru_cache(maxsize=16)
def _pil_font(path: str, index: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, GLYPH_EM, index=index)


@lru_cache(maxsize=6000)
def glyph_bitmap(face: FontFace, char: str) -> np.ndarray:
    """Coverage bitmap (float32 in [0, 1]) of ``char``, em box centred in a padded square.

    The em square spans ``GLYPH_EM`` pixels around the centre of a ``GLYPH_EM + 2 * pad`` side.
    """
    side = GLYPH_EM + 2 * _GLYPH_PAD
    image = Image.new("L", (side, side), 0)
    ImageDraw.Draw(image).text(
        (side / 2, side / 2), char, fill=255, font=_pil_font(face.path, face.index), anchor="mm"
    )
    bitmap = np.asarray(image, dtype=np.float32) / 255.0
    bitmap.setflags(write=False)
    return bitmap


@lru_cache(maxsize=1)
def display_font() -> FontFace | None:
    """A face with kana and kanji for labels in pictures and plots: the fonts hwexp installs
    (IPAexGothic, Noto Sans CJK JP), else a Japanese system font; None if there is none."""
    from hwexp.synth.options import DEFAULT_FONTS

    try:
        faces = resolve_fonts(DEFAULT_FONTS, False)
    except FontUnavailable:
        faces = ()
    faces = faces or tuple(system_faces())
    return faces[0] if faces else None
