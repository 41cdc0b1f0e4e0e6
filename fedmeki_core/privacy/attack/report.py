"""The gradient-leakage report: a table for the terminal, `dlg.md`, `dlg.csv`, and `dlg.png` (drawn with Pillow,
a main dependency, so the command needs no plotting library)."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fedmeki_core.privacy.attack.scenarios import AttackResult, AttackSettings, GreyImage

ZOOM = 3  # pixels per image pixel in the PNG
GAP = 4
LABEL_HEIGHT = 14


def _scenarios(results: Sequence[AttackResult]) -> list[str]:
    return list(dict.fromkeys(result.scenario for result in results))


def _seeds(results: Sequence[AttackResult]) -> list[int]:
    return list(dict.fromkeys(result.seed for result in results))


def _cell(result: AttackResult | None) -> str:
    if result is None:
        return "-"
    value = "inf" if math.isinf(result.psnr) else f"{result.psnr:.1f}"
    return f"{value} dB / {result.ssim:.3f}"


def _grid(results: Sequence[AttackResult]) -> list[list[str]]:
    """Rows of the table: a header, then one row per scenario with `PSNR / SSIM` per seed."""
    by_key = {(result.scenario, result.seed): result for result in results}
    seeds = _seeds(results)
    rows = [["scenario", *(f"seed {seed}: PSNR / SSIM" for seed in seeds)]]
    rows += [[scenario, *(_cell(by_key.get((scenario, seed))) for seed in seeds)] for scenario in _scenarios(results)]
    return rows


def format_table(results: Sequence[AttackResult]) -> str:
    rows = _grid(results)
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ("  ".join(text.ljust(width) for text, width in zip(row, widths, strict=True)) for row in rows)
    return "\n".join(line.rstrip() for line in lines)


def write_markdown(path: Path, results: Sequence[AttackResult], settings: AttackSettings, command: str) -> None:
    rows = _grid(results)
    lines = [
        "# Gradient leakage (DLG) against what the coordinator holds after a round",
        "",
        f"`{command}`",
        "",
        f"Each silo of {settings.silos} took one SGD step on one 32 x 32 synthetic X-ray (lung-opacity) of DLG's",
        f"sigmoid LeNet; the attack (inverting gradients: cosine loss, total variation, Adam, {settings.steps} steps;",
        "label by iDLG) rebuilt an image from each view. PSNR (dB) and SSIM against the silo's true input:",
        "",
        "| " + " | ".join(rows[0]) + " |",
        "|" + "---|" * len(rows[0]),
        *("| " + " | ".join(row) + " |" for row in rows[1:]),
        "",
        "Notes:",
        "",
    ]
    for scenario in _scenarios(results):
        notes = {result.seed: result.note for result in results if result.scenario == scenario}
        if len(set(notes.values())) == 1:
            lines.append(f"- {scenario}: {next(iter(notes.values()))}")
        else:
            lines += [f"- {scenario}, seed {seed}: {note}" for seed, note in notes.items()]
    lines += ["", "Images: `dlg.png` (per seed, each scenario's original beside its reconstruction).", ""]
    path.write_text("\n".join(lines))


def write_csv(path: Path, results: Sequence[AttackResult]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["scenario", "seed", "psnr_db", "ssim", "silo", "note"])
        for result in results:
            writer.writerow(
                [result.scenario, result.seed, f"{result.psnr:.4f}", f"{result.ssim:.5f}", result.silo, result.note]
            )


def write_png(path: Path, results: Sequence[AttackResult]) -> None:
    """A row per seed; per scenario, the original (left) beside the reconstruction (right), titled with its PSNR."""
    scenarios, seeds = _scenarios(results), _seeds(results)
    side = results[0].original.shape[-1] * ZOOM
    pair = 2 * side + GAP
    width = len(scenarios) * (pair + 3 * GAP) + GAP
    height = len(seeds) * (side + LABEL_HEIGHT + GAP) + LABEL_HEIGHT + GAP
    canvas = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(canvas)
    for column, scenario in enumerate(scenarios):
        draw.text((GAP + column * (pair + 3 * GAP), 2), scenario, fill=0)
    for row, seed in enumerate(seeds):
        top = LABEL_HEIGHT + GAP + row * (side + LABEL_HEIGHT + GAP)
        for result in results:
            if result.seed != seed:
                continue
            left = GAP + scenarios.index(result.scenario) * (pair + 3 * GAP)
            draw.text((left, top), f"seed {seed}: {_cell(result).split(' / ')[0]}", fill=0)
            canvas.paste(_tile(result.original), (left, top + LABEL_HEIGHT))
            canvas.paste(_tile(result.reconstruction), (left + side + GAP, top + LABEL_HEIGHT))
    canvas.save(path, format="PNG")


def _tile(image: GreyImage) -> Image.Image:
    grey = np.clip(np.asarray(image, dtype=np.float64) * 255 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(np.kron(grey, np.ones((ZOOM, ZOOM), dtype=np.uint8)))
