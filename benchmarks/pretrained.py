"""A ~1B-parameter Llama-shaped base federated with LoRA on the CPU: silo memory, round time, bytes on the wire.

    python -m benchmarks.pretrained --layers 22 --silos 1 --rounds 2      (or: fedmeki bench pretrained ...)

Builds a Llama from a LlamaConfig (hidden 2048, MLP 5632, 32 heads / 4 KV heads, vocab 32000: TinyLlama's shape,
1.1B parameters at 22 layers) with random weights and `save_pretrained`s it as a hospital's folder would hold it;
a real coordinator process and N real silo agent processes (`fedmeki-silo run`, every silo mapping the folder in
silo.yaml `models`, `devices` as given) federate LoRA adapters on it with a tiny batch and sequence. Reports the
silos' peak RSS, seconds per round, the bytes each upload carried against the base's bytes, and the coordinator's
peak RSS, which does not depend on the base (it never holds it). `--ranks 1,2 --sharding fsdp` federates once per
rank count on the same base in the same run (silo.yaml `devices: [cpu, cpu]`, `sharding: fsdp`: gloo ranks, the
base sharded), with each rank process's peak RSS. A JSON line per federation, then one of all the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.bases import DTYPES, WORDS, save_llama
from benchmarks.memory import memory_kib
from benchmarks.scratch import scratch
from fedmeki_core.app.demo import add_silo
from fedmeki_core.client import FedmekiClient
from fedmeki_core.jobspec import parse_job_spec


def _instructions(path: Path, count: int, seed: int) -> Path:
    topics = WORDS[4:8]
    lines = [
        {"instruction": f"which option treats the {topics[i % 4]} ?", "input": "a b c d", "output": "abcd"[i % 4]}
        for i in range(seed, seed + count)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _start(args: list[str], log: Path) -> subprocess.Popen[str]:
    with log.open("w") as stderr:
        return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=stderr, text=True)


def run(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    base = work / "base"
    started = time.monotonic()
    params = save_llama(base, "1.1b", DTYPES[args.dtype], layers=args.layers, max_length=256)
    base_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    print(f"base: {params / 1e9:.2f}B parameters, {base_bytes / 2**30:.2f} GiB, {time.monotonic() - started:.0f}s")
    runs = []
    for ranks in args.ranks:  # one federation per rank count, on the same base, one after the other
        runs.append(federate(work / f"ranks-{ranks}", base, args, ranks))
        print(json.dumps(runs[-1]), flush=True)
    return {
        "params": params,
        "dtype": args.dtype,
        "layers": args.layers,
        "lora_rank": args.rank,
        "silos": args.silos,
        "samples_per_silo": args.samples,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "base_bytes": base_bytes,
        "runs": runs,
    }


def federate(work: Path, base: Path, args: argparse.Namespace, ranks: int) -> dict[str, Any]:
    """A coordinator process and the silo agent processes (each over `ranks` CPU ranks) federating the job."""
    data_dir = work / "c"
    data_dir.mkdir(parents=True)
    coordinator = _start(
        ["-m", "coordinator", "serve", "--address", "127.0.0.1:0", "--data-dir", str(data_dir)],
        work / "coordinator.log",
    )
    agents: list[subprocess.Popen[str]] = []
    peaks: dict[int, int] = {}
    rank_peaks: dict[int, int] = {}  # the peak RSS of each rank process, by pid
    try:
        assert coordinator.stdout is not None
        match = re.search(r"(\d+\.\d+\.\d+\.\d+:\d+)", coordinator.stdout.readline())
        assert match is not None, (work / "coordinator.log").read_text()
        address = match.group(1)
        for index in range(args.silos):
            folder = work / f"silo-{index}"
            token = add_silo(f"silo-{index}", "--data-dir", str(data_dir))
            enroll = ["-m", "silo_agent", "enroll", "--coordinator", address, "--token", token, "--work-dir"]
            subprocess.run([sys.executable, *enroll, str(folder)], check=True, capture_output=True)
            settings: dict[str, Any] = {
                "coordinator": address,
                "work_dir": str(folder),
                "device": "cpu",
                "data": {"instructions": str(_instructions(folder / "cards.jsonl", args.samples, seed=index))},
                "models": {"llama": str(base)},
                "poll_wait_seconds": 2,
                "sharding": args.sharding,
            }
            if ranks > 1:
                settings["devices"] = ["cpu"] * ranks
            (folder / "silo.yaml").write_text(yaml.safe_dump(settings))
            command = ["-m", "silo_agent", "--log-level", "INFO", "run", "--config", str(folder / "silo.yaml")]
            agents.append(_start(command, folder / "agent.log"))
        spec = parse_job_spec(
            {
                "name": "pretrained-bench",
                "task": "instructions",
                "rounds": args.rounds,
                "min_silos": args.silos,
                "round_deadline_seconds": 7200,
                "algorithm": {"batch_size": args.batch_size, "learning_rate": 1e-3},
                "model": {
                    "architecture": "causal-lm",
                    "pretrained": "llama",
                    "config": {"max_length": args.max_length},
                    "lora": {"rank": args.rank, "alpha": 2 * args.rank, "target_modules": ["q_proj", "v_proj"]},
                },
            }
        )
        with FedmekiClient(address) as client:
            job = client.submit_job(spec, base=base)
            while not (final := client.get_job(job.id)).state.finished:
                for index, agent in enumerate(agents):  # the silo's rank processes, when it has several, too
                    peaks[index] = max(peaks.get(index, 0), _tree_kib(agent.pid, rank_peaks))
                time.sleep(0.5)
        silo_peak_kib = [max(peaks.get(i, 0), memory_kib(agent.pid, "VmHWM")) for i, agent in enumerate(agents)]
        agent_peak_kib = [memory_kib(agent.pid, "VmHWM") for agent in agents]
        coordinator_peak_kib = memory_kib(coordinator.pid, "VmHWM")
    finally:
        for process in (*agents, coordinator):
            if process.poll() is None:
                process.terminate()
                process.wait()
    if final.state.value != "completed":
        raise RuntimeError(f"benchmark job ended {final.state.value}: {final.reason}")
    uploads = [
        int(size)
        for index in range(args.silos)
        for size in re.findall(r"uploaded a delta of (\d+) bytes", (work / f"silo-{index}" / "agent.log").read_text())
    ]
    rounds = [
        (r.closed_at - r.opened_at).total_seconds()
        for r in final.rounds
        if r.kind.value == "train" and r.opened_at and r.closed_at
    ]
    return {
        "ranks_per_silo": ranks,
        "sharding": args.sharding if ranks > 1 else "none",
        "round_s": rounds,
        "upload_bytes": uploads,
        "upload_vs_base": max(uploads) / sum(f.stat().st_size for f in base.glob("*.safetensors")),
        "silo_peak_rss_gib": [kib / 2**20 for kib in silo_peak_kib],
        # what trains: the agent itself on one rank; its rank processes (sampled twice a second) on several
        "rank_peak_rss_gib": sorted(kib / 2**20 for kib in rank_peaks.values()),
        "agent_peak_rss_gib": [kib / 2**20 for kib in agent_peak_kib],
        "coordinator_peak_rss_mib": coordinator_peak_kib / 1024,
    }


def _tree_kib(pid: int, rank_peaks: dict[int, int]) -> int:
    """RSS of a process and its children now (an agent and the ranks it launched), in KiB; each child's peak RSS
    so far goes into `rank_peaks`."""
    total = memory_kib(pid, "VmRSS")
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        for child_pid in child.read_text().split():
            try:
                total += memory_kib(int(child_pid), "VmRSS")
                rank_peaks[int(child_pid)] = max(rank_peaks.get(int(child_pid), 0), memory_kib(int(child_pid), "VmHWM"))
            except (OSError, RuntimeError):
                continue  # it ended meanwhile
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--layers", type=int, default=22, help="decoder layers (22: 1.1B parameters)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="the saved base's weights")
    parser.add_argument("--silos", type=int, default=1)
    parser.add_argument(
        "--ranks",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[1],
        help="CPU ranks per silo (silo.yaml devices); a list (1,2) runs one federation per count, same base, same run",
    )
    parser.add_argument("--sharding", choices=["none", "fsdp"], default="none", help="silo.yaml sharding (ranks > 1)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (q_proj, v_proj)")
    parser.add_argument("--samples", type=int, default=10, help="instructions per silo (a fifth held out)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with scratch("fedmeki-bench-pretrained-") as work:
        result = run(work, args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
