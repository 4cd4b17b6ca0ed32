"""Helpers of the figure tests: a PNG's pixel size, and that a figure is drawn."""

from __future__ import annotations

import struct

from fedprune.outputs import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) in pixels, from the PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    return struct.unpack(">II", data[16:24])


def assert_figure(path, inches):
    """`path` is a PNG of `inches` x DPI pixels, not blank, with its PDF; no temp file left."""
    from matplotlib import image

    assert png_size(path) == tuple(round(i * plots.DPI) for i in inches)
    pixels = image.imread(path)[..., :3]
    drawn = (pixels < 0.9).any(axis=-1).mean()  # fraction of pixels that are not near-white
    assert 0.01 < drawn < 0.9
    assert path.with_suffix(".pdf").read_bytes().startswith(b"%PDF")
    assert not [p.name for p in path.parent.iterdir() if p.name.startswith(".tmp")]
