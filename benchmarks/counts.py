"""Parameter counts as people write them: 0.1M, 10M, 1G."""

from __future__ import annotations

import argparse
import re


def parse_count(text: str) -> int:
    match = re.fullmatch(r"([\d.]+)([KMG]?)", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"not a parameter count: {text!r} (e.g. 1M, 100M, 0.1M)")
    return int(float(match.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[match.group(2)])
