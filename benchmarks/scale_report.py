"""The outputs of `fedmeki bench scale`: a CSV row per point, a Markdown table for the docs, a PNG."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

COLUMNS = (
    "silos",
    "params",
    "model_bytes",
    "rounds",
    "processes",
    "status",  # ok, or "skipped: why" / "failed: why" (its figures are then empty)
    "round_s",  # median of rounds 2..R: from the previous round's close to this one's
    "dispatch_download_s",  # from the round's opening until the last silo holds the global model
    "upload_phase_s",  # from the first silo's update ready to the last one accepted
    "commit_s",  # from the last update accepted to the round's close (aggregate, checkpoint, commit)
    "raw_upload_s",
    "raw_download_s",
    "grpc_bound_s",  # N concurrent raw uploads then N downloads of the same bytes, same run, same processes
    "ratio",  # round_s / grpc_bound_s
    "submit_s",  # SubmitJob (its weights streamed) while N silos poll
    "threads_idle",
    "threads_peak",
    "fds_idle",
    "fds_peak",
    "sockets_per_waiting_silo",  # (sockets at idle - before any silo connected) / N: 1 a connection each
    "rss_idle_mib",  # with every silo connected and polling
    "rss_peak_above_idle_mib",
    "rss_per_waiting_silo_kib",  # (idle RSS - RSS before any silo connected) / N
    "cpu_s_per_silo_round",  # coordinator CPU over the job / (silos x rounds, evaluation included)
    "silo_cpu_s_per_silo_round",  # the silo processes' CPU over the job, the same way
    "raw_cpu_s_per_silo",  # the raw-gRPC bound's processes' CPU (clients and server) / N
    # (coordinator + silo CPU) / (rounds x cores): no round of this run's work fits in less time on this machine
    "cpu_floor_s",
    "cpu_floor_ratio",  # cpu_floor_s / grpc_bound_s: above the target ratio, the target needs less CPU, not overlap
    "bytes_per_round",
    "db_rows_per_round",  # rows inserted over the job / rounds (evaluation included)
    # the last silo's update in (from the round's opening) over the median silo's, worst of rounds 2..R
    "upload_fairness",
)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| silos | params | round s | dispatch+download s | upload phase s | commit s | raw-gRPC bound s | ratio | "
        "submit s | threads idle/peak | fds idle/peak | RSS idle / peak above idle MiB | upload max/median | "
        "CPU ms per silo-round: coordinator / silos / raw | CPU floor s (÷ bound) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['silos']} | {r['params'] / 1e6:g}M |"
        if r["status"] != "ok":
            if "submit_s" not in r:
                lines.append(f"{head} {r['status']} |" + " |" * 12)
                continue
            # a run past its time: what the coordinator showed until then
            memory = f"{r['rss_idle_mib']:.0f} / {r['rss_peak_above_idle_mib']:.0f}"
            lines.append(
                f"{head} {r['status']} | | | | | | {r['submit_s']:.3f} | {r['threads_idle']}/{r['threads_peak']} | "
                f"{r['fds_idle']}/{r['fds_peak']} | {memory} | | | |"  # fairness and CPU: not known
            )
            continue
        lines.append(
            f"{head} {r['round_s']:.3f} | {r['dispatch_download_s']:.3f} | {r['upload_phase_s']:.3f} | "
            f"{r['commit_s']:.3f} | {r['grpc_bound_s']:.3f} | {r['ratio']:.1f}x | {r['submit_s']:.3f} | "
            f"{r['threads_idle']}/{r['threads_peak']} | {r['fds_idle']}/{r['fds_peak']} | "
            f"{r['rss_idle_mib']:.0f} / {r['rss_peak_above_idle_mib']:.0f} | {r['upload_fairness']:.2f} | "
            f"{1000 * r['cpu_s_per_silo_round']:.1f} / {1000 * r['silo_cpu_s_per_silo_round']:.1f} / "
            f"{1000 * r['raw_cpu_s_per_silo']:.1f} | {r['cpu_floor_s']:.3f} ({r['cpu_floor_ratio']:.1f}x) |"
        )
    return "\n".join(lines) + "\n"


def write_plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "ok"]
    figure, ((times, ratios), (threads, memory)) = plt.subplots(2, 2, figsize=(11, 8))
    for params in sorted({r["params"] for r in done}):
        points = [r for r in done if r["params"] == params]
        silos = [r["silos"] for r in points]
        label = f"{params / 1e6:g}M"
        times.plot(silos, [r["round_s"] for r in points], "o-", label=f"round, {label}")
        times.plot(silos, [r["grpc_bound_s"] for r in points], "s--", label=f"raw gRPC, {label}")
        ratios.plot(silos, [r["ratio"] for r in points], "o-", label=label)
        threads.plot(silos, [r["threads_peak"] for r in points], "o-", label=f"threads, {label}")
        threads.plot(silos, [r["fds_peak"] for r in points], "s--", label=f"open fds, {label}")
        memory.plot(silos, [r["rss_peak_above_idle_mib"] for r in points], "o-", label=f"peak above idle, {label}")
        memory.plot(silos, [r["rss_idle_mib"] for r in points], "s--", label=f"idle, {label}")
    for axis, title, unit in (
        (times, "round time", "seconds"),
        (ratios, "round / raw-gRPC bound", "ratio"),
        (threads, "coordinator threads and descriptors (peak)", "count"),
        (memory, "coordinator RSS", "MiB"),
    ):
        axis.set_title(title)
        axis.set_xlabel("silos")
        axis.set_ylabel(unit)
        axis.set_xscale("log", base=2)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    times.set_yscale("log")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
