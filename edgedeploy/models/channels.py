"""Channel-count rounding shared by every width-scaled architecture."""

from __future__ import annotations

import math


def make_divisible(value: float, divisor: int = 8, *, rounding: str, min_value: int | None = None) -> int:
    """Round a scaled channel count to a multiple of `divisor`.

    rounding="nearest": the TF/torchvision rule of MobileNet/EfficientNet: the nearest multiple, at least
    `min_value` (default `divisor`), one step up when that would drop more than 10% of `value`.
    rounding="ceil": YOLOv5's rule, the next multiple up (`min_value` does not apply).
    """
    if rounding == "ceil":
        return int(math.ceil(value / divisor) * divisor)
    if rounding != "nearest":
        raise ValueError(f"rounding={rounding!r}: use 'nearest' or 'ceil'")
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded
