"""`fedmeki attack dlg`: the gradient-leakage report (deep leakage from gradients against a round's views)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedmeki_core.errors import InvalidInputError


def _numbers(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> tuple[int | float, ...]:
        try:
            return tuple(kind(part) for part in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None

    return parse


def _dlg(args: argparse.Namespace) -> int:
    from fedmeki_core.privacy.attack.report import format_table, write_csv, write_markdown, write_png
    from fedmeki_core.privacy.attack.scenarios import AttackSettings, run_attacks

    if args.silos < 2 or args.steps < 1 or min(args.dp_noise) <= 0:
        raise InvalidInputError("--silos must be at least 2, --steps at least 1, and every --dp-noise positive")
    settings = AttackSettings(steps=args.steps, silos=args.silos, dp_noise=args.dp_noise)
    command = (
        f"fedmeki attack dlg --seeds {','.join(map(str, args.seeds))} --steps {args.steps} --silos {args.silos} "
        f"--dp-noise {','.join(f'{n:g}' for n in args.dp_noise)} --out {args.out}"
    )
    results = []
    for result in run_attacks(args.seeds, settings):
        print(f"seed {result.seed} {result.scenario}: PSNR {result.psnr:.2f} dB, SSIM {result.ssim:.3f}", flush=True)
        results.append(result)
    args.out.mkdir(parents=True, exist_ok=True)
    write_markdown(args.out / "dlg.md", results, settings, command)
    write_csv(args.out / "dlg.csv", results)
    write_png(args.out / "dlg.png", results)
    print(f"\n{format_table(results)}\n\nwritten: {args.out / 'dlg.md'}, dlg.csv, dlg.png")
    return 0


def add_attack_command(commands: Any) -> None:
    """`fedmeki attack dlg` on the main parser's subcommands."""
    attack = commands.add_parser("attack", help="privacy attacks on what the coordinator holds").add_subparsers(
        dest="attack_command", required=True
    )
    dlg = attack.add_parser(
        "dlg",
        help="deep leakage from gradients against a silo's plaintext delta, the aggregate, a CKKS ciphertext "
        "and a DP-noised delta; PSNR and SSIM of the reconstructions",
    )
    dlg.add_argument("--seeds", type=_numbers(int), default=(0, 1, 2), help="comma-separated (default 0,1,2)")
    dlg.add_argument("--steps", type=int, default=2000, help="the attack's optimiser steps per reconstruction")
    dlg.add_argument("--silos", type=int, default=3, help="silos whose deltas the aggregate averages")
    dlg.add_argument(
        "--dp-noise",
        type=_numbers(float),
        default=(0.1, 1.0),
        help="local DP noise std in multiples of the delta's RMS entry, comma-separated (default 0.1,1)",
    )
    dlg.add_argument("--out", type=Path, required=True, help="folder for dlg.md, dlg.csv and dlg.png")
    dlg.set_defaults(handler=_dlg)
