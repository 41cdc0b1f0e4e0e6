"""The gradient-leakage report: PSNR and SSIM against hand values, iDLG's label, `fedmeki attack dlg` end to end
on a tiny budget, and (slow) the issue's claims about what the attack recovers from each view of a round."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedmeki_core.app.cli import main
from fedmeki_core.privacy.attack.dlg import build_model, infer_label, sgd_delta
from fedmeki_core.privacy.attack.similarity import K1, psnr, ssim

SCENARIOS = ["plaintext", "aggregate", "ckks", "dp 0.1x", "dp 1x", "prior"]


def test_psnr_and_ssim_against_hand_values() -> None:
    image = np.random.default_rng(0).random((32, 32))
    assert psnr(image, image) == math.inf and ssim(image, image) == pytest.approx(1.0, abs=1e-12)
    grey, lighter = np.full((32, 32), 0.5), np.full((32, 32), 0.6)
    assert psnr(lighter, grey) == pytest.approx(20.0, abs=1e-9)  # MSE 0.01
    # Flat images: only the luminance term is left, (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1).
    c1 = K1**2
    assert ssim(lighter, grey) == pytest.approx((2 * 0.5 * 0.6 + c1) / (0.5**2 + 0.6**2 + c1), abs=1e-12)
    checkerboard = 0.05 * (-1.0) ** np.add.outer(np.arange(32), np.arange(32))
    assert psnr(grey + checkerboard, grey) == pytest.approx(10 * math.log10(1 / 0.05**2), abs=1e-9)  # 26.02 dB
    assert ssim(1.0 - image, image) < -0.9  # inverted structure
    assert ssim(image[None, None], image) == pytest.approx(1.0, abs=1e-12)  # [1, 1, H, W] is one grey image
    with pytest.raises(ValueError, match="one shape"):
        psnr(image, image[:16])
    with pytest.raises(ValueError, match="at least 11"):
        ssim(image[:8, :8], image[:8, :8])


@pytest.mark.parametrize("label", [0, 1])
def test_the_label_of_a_single_sample_update_is_read_off_the_last_bias(label: int) -> None:
    image = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(label))
    update = sgd_delta(build_model(seed=3), image, torch.tensor([label]), learning_rate=0.1)
    assert infer_label(update) == label


def test_fedmeki_attack_dlg_writes_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    assert main(["attack", "dlg", "--seeds", "0", "--steps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(f"seed 0 {scenario}: PSNR" in printed for scenario in SCENARIOS)
    with (out / "dlg.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [row["scenario"] for row in rows] == SCENARIOS
    assert all(math.isfinite(float(row["psnr_db"])) and -1 <= float(row["ssim"]) <= 1 for row in rows)
    ckks = rows[SCENARIOS.index("ckks")]["note"]
    assert ckks.startswith("no plaintext available: decrypting with the public context fails")
    report = (out / "dlg.md").read_text()
    assert "`fedmeki attack dlg --seeds 0 --steps 2 --silos 3 --dp-noise 0.1,1 --out" in report
    assert "| plaintext |" in report and "| dp 1x |" in report
    with Image.open(out / "dlg.png") as png:
        assert png.format == "PNG" and png.width > 6 * 2 * 96 and png.height > 96


def test_fedmeki_attack_dlg_refuses_a_bad_setting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["attack", "dlg", "--silos", "1", "--out", str(tmp_path)]) == 2
    assert "--silos must be at least 2" in capsys.readouterr().err


# The claims, on the report's default settings (3 seeds, 2000 steps, 3 silos): about 3 min on 2 cores.
# Two do not hold on this model and data; they are strict xfails with the measured numbers, so they fail loudly if
# they ever start to hold.


@pytest.fixture(scope="module")
def psnr_by_scenario() -> dict[str, list[float]]:
    from fedmeki_core.privacy.attack.scenarios import AttackSettings, run_attacks

    table: dict[str, list[float]] = {}
    for result in run_attacks((0, 1, 2), AttackSettings()):
        table.setdefault(result.scenario, []).append(result.psnr)
    return table


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_plaintext_single_sample_update_is_reconstructed(psnr_by_scenario: dict[str, list[float]]) -> None:
    assert sum(value >= 30 for value in psnr_by_scenario["plaintext"]) >= 2, psnr_by_scenario


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_coordinators_view_under_ckks_is_chance_level(psnr_by_scenario: dict[str, list[float]]) -> None:
    assert max(psnr_by_scenario["ckks"]) <= 12, psnr_by_scenario


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_dp_noise_of_the_typical_entry_defeats_the_attack(psnr_by_scenario: dict[str, list[float]]) -> None:
    assert max(psnr_by_scenario["dp 1x"]) <= 12, psnr_by_scenario


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.xfail(
    strict=True,
    reason="the issue's claim does not hold here: 14.8-15.4 dB at 10% of the RMS entry (docs/privacy-report.md)",
)
def test_dp_noise_of_a_tenth_of_the_typical_entry_defeats_the_attack(psnr_by_scenario: dict[str, list[float]]) -> None:
    assert max(psnr_by_scenario["dp 0.1x"]) <= 12, psnr_by_scenario


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.xfail(
    strict=True,
    reason="the issue's claim does not hold here: 38.9 / 26.6 / 11.2 dB; a silo whose update dominates the mean "
    "is reconstructed from it (docs/privacy-report.md)",
)
def test_the_mean_of_3_silos_hides_every_input(psnr_by_scenario: dict[str, list[float]]) -> None:
    assert max(psnr_by_scenario["aggregate"]) <= 12, psnr_by_scenario
