"""The pretrained-base benchmarks run end to end at tiny sizes on the CPU, so the code paths scripts/gpu-check takes
on a GPU (`--shape 7b`, QLoRA, the grid's pretrained ViT) are exercised where there is none; no timing is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bench_cli import bench_figures, bench_output

from benchmarks import peft_throughput
from benchmarks.bases import save_vit
from benchmarks.fedmeki_grid import TASKS
from benchmarks.grid_vit import XRAY_TASKS

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(900)  # about a minute, more on a loaded machine
def test_peft_throughput_trains_the_same_steps_through_fedmeki_and_a_plain_peft_loop() -> None:
    figures = bench_figures("peft", "--shape", "tiny", "--steps", "4", timeout=600)[-1]
    assert figures["shape"] == "tiny" and figures["quantization"] == "none" and figures["lora_rank"] == 16
    assert (figures["batch_size"], figures["max_length"], figures["steps"]) == (4, 64, 4)
    rates = figures["tokens_per_s"]
    peaks = figures["peak_memory_bytes"]
    assert isinstance(rates, dict) and isinstance(peaks, dict)
    assert rates["fedmeki"] > 0 and rates["peft"] > 0
    assert figures["ratio"] == pytest.approx(rates["fedmeki"] / rates["peft"])
    assert figures["peak_memory"] == "peak RSS" and peaks["fedmeki"] > 0 and peaks["peft"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without CUDA")
def test_qlora_is_declined_clearly_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        peft_throughput.main(["--shape", "tiny", "--quantization", "4bit"])
    assert exited.value.code == 2
    assert "--quantization 4bit (QLoRA) needs a CUDA device; this machine has none" in capsys.readouterr().err


@pytest.mark.timeout(900)  # 3 silos and an injector in one process, 2 jobs: minutes on a loaded 2-core machine
def test_the_fedmeki_grid_federates_the_x_ray_tasks_on_a_pretrained_vit_the_silos_hold(tmp_path: Path) -> None:
    vit = tmp_path / "vit"
    save_vit(vit, "tiny")
    out = tmp_path / "grid"
    arguments = ["--quick", "--algorithms", "", "--baselines", "", "--single-task", "", "--rounds", "1"]
    arguments += ["--partitions", "dirichlet", "--samples", "120", "--round-deadline", "600", "--out", str(out)]
    bench_output("fedmeki", *arguments, "--pretrained-vit", str(vit), timeout=600)
    row = next(line for line in (out / "fedmeki-grid.csv").read_text().splitlines() if "pretrained-vit" in line)
    cells = dict(zip(["approach", *TASKS], row.split(","), strict=True))
    assert cells["approach"] == "fedavg / dirichlet / pretrained-vit / federated"
    for task in TASKS:
        if task in XRAY_TASKS:
            assert 0 <= float(cells[task]) <= 1, cells
        else:
            assert cells[task] == "-"
    assert "fedavg/dirichlet/pretrained-vit" in (out / "fedmeki-grid.md").read_text()


def test_the_grid_refuses_a_vit_of_another_image_size(tmp_path: Path) -> None:
    vit = str(tmp_path / "vit")
    save_vit(Path(vit), "tiny")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.fedmeki_grid", "--quick", "--image-size", "64", "--pretrained-vit", vit],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,  # importing the grid's modules alone takes minutes on a loaded machine
        check=False,
    )
    assert result.returncode == 2
    assert "--pretrained-vit takes 32-pixel images: give that --image-size" in result.stderr
