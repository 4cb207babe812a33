"""Colour maps for class-id mask images (palette PNGs), shared by the VOC reader and the synthetic set."""

from __future__ import annotations


def voc_palette(n: int = 256) -> list[int]:
    """The Pascal VOC colour map (bit-interleaved), flat [r0, g0, b0, r1, ...] for PIL's putpalette."""
    palette = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette
