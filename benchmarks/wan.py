"""Rounds over emulated WAN links: every silo behind its own delay line, against the link's own bound.

    python -m benchmarks.wan --profiles 40ms-200M,100ms-50M --params 10M --silos 2 --rounds 3 --out docs/wan
    (or: fedmeki bench wan ...)

Each silo of `benchmarks.round` dials the coordinator through a `benchmarks.delay_line` process (the shared
profile: one process, one link for all silos). The **link bound** of a round is the model down plus the delta
up at the link's rates (a shared link carries every silo's bytes) plus the round trips the protocol needs
between two commits: the upload's receipt and the next NextTask (1), the NextTask answer and the DownloadModel
request (1), its first bytes (0.5), the upload's first bytes (0.5): 3 (a silo's first attempt at a fresh delta no
longer asks UploadOffset first: 4 before). `--windows before`
runs the coordinator with HTTP/2's default 64 KiB receive window (the fixed window before
`stream_window_bytes`), `both` runs both in the same session, alternating. `--encodings float32,int8` runs each
profile once per delta encoding; a lossy one (int8, topk) moves deltas both ways (`downloads: delta`), and its
ratio is still against the float32 link bound (the same model's bytes at float32). Writes wan.csv and wan.png.

`--netns` runs each silo in its own network namespace whose only way out is its delay line (`benchmarks.netns`).
`--vs flower` runs Flower's Deployment Runtime through the same profile in the same run, each SuperNode always in
its own namespace; each link must carry at least the arrays Flower moved (the model, each way, each round), or the
row fails: bytes that took another route, or were never sent (Flower sends identical chunks once), would show.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks import netns, vs_flower
from benchmarks.counts import parse_count
from benchmarks.delay_line import PROFILES, Profile
from benchmarks.round import run_round
from benchmarks.scratch import scratch
from fedmeki_core.encodings import ENCODINGS
from fedmeki_core.wire import DEFAULT_CHUNK_BYTES

ROUND_TRIPS = 3
WINDOWS = {"after": {}, "before": {"FEDMEKI_COORDINATOR_STREAM_WINDOW_BYTES": "65535"}}
_COLUMNS = (
    "profile",
    "windows",
    "params",
    "silos",
    "model_bytes",
    "round_s",
    "download_s",
    "local_s",
    "upload_s",
    "aggregate_commit_s",
    "link_bound_s",
    "ratio",
    "coordinator_peak_rss_above_idle_bytes",
    "share_min",
    "share_max",
    "bytes_up",
    "bytes_down",
    "isolated",
    "flower_round_s",
    "flower_ratio",
    "flower_carried_vs_arrays_min",
    "encoding",
)


def link_bound(profile: Profile, model_bytes: int, silos: int) -> float:
    """Seconds a round needs at least on this link: bytes at the link's rates plus the protocol's round trips."""
    sharing = silos if profile.shared else 1
    bits = model_bytes * 8 * sharing
    return bits / profile.down_bps + bits / profile.up_bps + ROUND_TRIPS * profile.rtt_s


def fair_shares(profile: Profile, model_bytes: int, silos: int, silo_s: list[dict[str, float]]) -> list[float]:
    """Each silo's download and upload rate as a fraction of its fair share of the link (1.0: exactly fair)."""
    sharing = silos if profile.shared else 1
    fair = {"download_s": profile.down_bps / 8 / sharing, "upload_s": profile.up_bps / 8 / sharing}
    return [model_bytes / phases[key] / fair[key] for phases in silo_s for key in fair]


class Links:
    """The delay-line processes of one run; `addresses` is round.py's SiloAddresses hook, and with `isolate` each
    silo gets a network namespace whose only way out is its link (`prefix` runs a silo's command inside it)."""

    def __init__(self, profile: Profile, isolate: bool = False) -> None:
        self.profile = profile
        self.isolate = isolate
        self.processes: list[subprocess.Popen[str]] = []
        self.namespaces: list[netns.Namespace] = []

    def addresses(self, target: str, silos: int) -> list[str]:
        groups = [silos] if self.profile.shared else [1] * silos
        ports: list[int] = []
        if self.isolate:
            for _ in range(silos):
                self.namespaces.append(netns.Namespace())  # one at a time: `links` closes those made if one fails
            port = int(target.rsplit(":", 1)[1])
            if any(namespace.reaches(port) for namespace in self.namespaces):
                raise RuntimeError(f"a silo's namespace reaches {target} without its link")
        for listeners in groups:
            inside = [f"--netns={ns.path}" for ns in self.namespaces[len(ports) : len(ports) + listeners]]
            process = subprocess.Popen(
                [
                    *(sys.executable, "-m", "benchmarks.delay_line", "serve", "--profile", self.profile.name),
                    *("--target", target, "--listeners", str(listeners), *inside),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert process.stdout is not None
            self.processes.append(process)
            ports += json.loads(process.stdout.readline())["ports"]
        return [f"127.0.0.1:{port}" for port in ports]  # in a silo's namespace when isolated

    def prefix(self, index: int) -> list[str]:
        return self.namespaces[index].prefix() if self.namespaces else []

    def reaches(self, index: int, port: int) -> bool:
        """Whether silo `index` can connect to 127.0.0.1:`port` (its namespace's, when isolated)."""
        return self.namespaces[index].reaches(port) if self.namespaces else vs_flower.Loopback().reaches(index, port)

    def close(self) -> list[dict[str, int]]:
        """Stop every link; the bytes each silo's link carried."""
        carried: list[dict[str, int]] = []
        for process in self.processes:
            out, _ = process.communicate(input="", timeout=30)  # end of input stops it
            carried += json.loads(out.strip().splitlines()[-1])["carried"]
        return carried


@contextmanager
def links(profile: Profile, isolate: bool = False) -> Iterator[Links]:
    running = Links(profile, isolate)
    try:
        yield running
    finally:
        for process in running.processes:
            if process.poll() is None:
                process.terminate()
                process.wait()
        for namespace in running.namespaces:
            namespace.close()


def run_wan(
    profile: Profile,
    windows: str,
    params: int,
    silos: int,
    rounds: int,
    tensors: int,
    chunk: int,
    isolate: bool = False,
    encoding: str = "float32",
) -> dict[str, Any]:
    with scratch("fedmeki-bench-wan-") as work, links(profile, isolate) as line:
        result = run_round(
            work,
            *(params, silos, rounds, chunk, tensors, 0, WINDOWS[windows]),
            silo_addresses=line.addresses,
            silo_prefix=line.prefix,
            encoding=encoding,
        )
        carried = line.close()
    bound = link_bound(profile, result["model_bytes"], silos)
    split = result.pop("split_s")
    result.pop("per_round")
    shares = fair_shares(profile, result["model_bytes"], silos, result.pop("silo_s"))
    return {
        "profile": profile.name,
        "windows": windows,
        **result,
        **split,
        "link_bound_s": bound,
        "ratio": result["round_s"] / bound,
        "share_min": min(shares),
        "share_max": max(shares),
        "bytes_up": sum(c["up"] for c in carried),
        "bytes_down": sum(c["down"] for c in carried),
        "carried": carried,
        "isolated": isolate,
    }


def run_flower_wan(profile: Profile, params: int, silos: int, rounds: int, tensors: int) -> dict[str, Any]:
    """Flower's round through the profile's links, each SuperNode in its own namespace; the bytes each link
    carried against the arrays Flower moved (the model each way each round), which they must at least cover."""
    with links(profile, isolate=True) as line:
        result = vs_flower.run_flower_round(params, silos, rounds, tensors, vs_flower.ROOT / ".venv-flower", line)
        carried = line.close()
    arrays = params * 4 * rounds  # float32, per SuperNode and direction
    covered = min(min(c["up"], c["down"]) for c in carried) / arrays
    if covered < 1:
        raise RuntimeError(
            f"a link carried {covered:.2f}x the arrays its SuperNode moved: some took another route or were never sent"
        )
    bound = link_bound(profile, params * 4, silos)
    return {
        "flower_round_s": result["round_s"],
        "flower_round_times_s": result["round_times_s"],
        "flower_link_bound_s": bound,
        "flower_ratio": result["round_s"] / bound,
        "flower_carried": carried,
        "flower_carried_vs_arrays_min": covered,
    }


def write_outputs(rows: list[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "wan.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['profile']}\n{r['windows']}, {r['encoding']}, {r['silos']} silos" for r in rows]
    xs = range(len(rows))
    flower = [r for r in rows if "flower_round_s" in r]
    width = 0.27 if flower else 0.4
    figure, axis = plt.subplots(figsize=(max(6.0, 1.3 * len(rows)), 4.5))
    axis.bar([x - width / 2 for x in xs], [r["round_s"] for r in rows], width, label="fedmeki round")
    axis.bar([x + width / 2 for x in xs], [r["link_bound_s"] for r in rows], width, label="link bound")
    for x, r in zip(xs, rows, strict=True):
        axis.annotate(f"{r['ratio']:.2f}x", (x - width / 2, r["round_s"]), ha="center", va="bottom", fontsize=8)
    if flower:  # Flower's round through the same links, its ratio to the same bound
        at = [float(x) + 1.5 * width for x, r in zip(xs, rows, strict=True) if "flower_round_s" in r]
        axis.bar(at, [r["flower_round_s"] for r in flower], width, label="Flower 1.41 round")
        for spot, r in zip(at, flower, strict=True):
            axis.annotate(f"{r['flower_ratio']:.1f}x", (spot, r["flower_round_s"]), ha="center", fontsize=8)
    axis.set_xticks(list(xs), labels, fontsize=7)
    axis.set_ylabel("seconds per round")
    axis.set_title(f"rounds over emulated WAN links ({rows[0]['params'] / 1e6:g}M float32 params)")
    axis.legend()
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / "wan.png", dpi=110)


def report(row: dict[str, Any]) -> None:
    print(
        f"{row['profile']:>22} {row['windows']:>6} {row['encoding']:>8} {row['silos']:>2} silos: "
        f"round {row['round_s']:.2f}s "
        f"(down {row['download_s']:.2f} / local {row['local_s']:.2f} / up {row['upload_s']:.2f} / "
        f"agg+commit {row['aggregate_commit_s']:.2f}), link bound {row['link_bound_s']:.2f}s, "
        f"{row['ratio']:.2f}x; each silo's rate {row['share_min']:.2f}-{row['share_max']:.2f}x its fair share; "
        f"coordinator peak above idle "
        f"{row['coordinator_peak_rss_above_idle_bytes'] / 2**20:.0f} MiB; links carried "
        f"{row['bytes_up'] / 2**20:.1f} MiB up, {row['bytes_down'] / 2**20:.1f} MiB down"
        f"{' (each silo in its own network namespace)' if row['isolated'] else ''}",
        flush=True,
    )
    if "flower_round_s" in row:
        print(
            f"{'':>22} Flower 1.41, same links, SuperNodes in namespaces: round {row['flower_round_s']:.2f}s, "
            f"{row['flower_ratio']:.2f}x the link bound; each link carried >= "
            f"{row['flower_carried_vs_arrays_min']:.3f}x the arrays its SuperNode moved",
            flush=True,
        )
    print(json.dumps(row), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fedmeki bench wan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profiles", default=",".join(PROFILES), help=f"among {', '.join(PROFILES)}")
    parser.add_argument("--params", type=parse_count, default=parse_count("10M"))
    parser.add_argument("--silos", type=int, default=2)
    parser.add_argument("--shared-silos", type=int, default=8, help="silos on a shared profile's one uplink")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tensors", type=int, default=195)
    parser.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES)
    parser.add_argument("--windows", choices=["after", "before", "both"], default="after")
    parser.add_argument("--encodings", default="float32", help="delta encodings to run, e.g. float32,int8")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--netns", action="store_true", help="each of our silos in its own network namespace")
    parser.add_argument(
        "--vs",
        choices=["flower"],
        help="also Flower's Deployment Runtime through the same links (namespaces: root)",
    )
    args = parser.parse_args(argv)
    if (args.netns or args.vs) and (reason := netns.refusal()):
        parser.error(f"network namespaces are needed for --netns and --vs flower: {reason}")
    names = [name for name in args.profiles.split(",") if name]
    unknown = [name for name in names if name not in PROFILES]
    if unknown:
        parser.error(f"unknown profile {unknown[0]!r}: choose among {', '.join(PROFILES)}")
    encodings = [name for name in args.encodings.split(",") if name]
    if unknown_encodings := [name for name in encodings if name not in ENCODINGS]:
        parser.error(f"unknown encoding {unknown_encodings[0]!r}: choose among {', '.join(ENCODINGS)}")
    variants = ["before", "after"] if args.windows == "both" else [args.windows]
    rows = []
    for _ in range(args.repeat):
        for name in names:
            profile = PROFILES[name]
            silos = args.shared_silos if profile.shared else args.silos
            for windows in variants:
                for encoding in encodings:
                    row = run_wan(
                        *(profile, windows, args.params, silos, args.rounds, args.tensors, args.chunk_bytes),
                        isolate=args.netns,
                        encoding=encoding,
                    )
                    if args.vs == "flower" and encoding == "float32":
                        row |= run_flower_wan(profile, args.params, silos, args.rounds, args.tensors)
                    report(row)
                    rows.append(row)
    write_outputs(rows, args.out)
    print(f"CSV and plot in {args.out}/wan.(csv|png)")


if __name__ == "__main__":
    main()
