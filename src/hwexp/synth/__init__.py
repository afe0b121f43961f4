"""Built-in synthetic handwriting: KanjiVG strokes and fonts drawn by seeded synthetic writers.

``render_writer(chars, writer, SynthOptions.from_config(cfg))`` returns a
:class:`~hwexp.data.raw.RawChunk` of scanned-cell-like images (ink high), one per char.
"""

from hwexp.synth.fonts import FontUnavailable, font_coverage
from hwexp.synth.kanjivg import MissingCharacters, missing_characters
from hwexp.synth.options import SynthOptions
from hwexp.synth.render import render_writer
from hwexp.synth.style import WriterStyle, writer_kind

__all__ = [
    "FontUnavailable",
    "MissingCharacters",
    "SynthOptions",
    "WriterStyle",
    "font_coverage",
    "missing_characters",
    "render_writer",
    "writer_kind",
]
