"""A ~1B-parameter Llama-shaped base federated with LoRA on the CPU: silo memory, round time, bytes on the wire.

    python -m benchmarks.pretrained --layers 22 --silos 1 --rounds 2      (or: fedmeki bench pretrained ...)

Builds a Llama from a LlamaConfig (hidden 2048, MLP 5632, 32 heads / 4 KV heads, vocab 32000: TinyLlama's shape,
1.1B parameters at 22 layers) with random weights and `save_pretrained`s it as a hospital's folder would hold it;
a real coordinator process and N real silo agent processes (`fedmeki-silo run`, every silo mapping the folder in
silo.yaml `models`, `devices` as given) federate LoRA adapters on it with a tiny batch and sequence. Reports the
silos' peak RSS, seconds per round, the bytes each upload carried against the base's bytes, and the coordinator's
peak RSS, which does not depend on the base (it never holds it). Ends with one JSON line of the figures.
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

import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.memory import memory_kib
from benchmarks.scratch import scratch
from fedmeki_core.app.demo import add_silo
from fedmeki_core.client import FedmekiClient
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.models.injection import word_tokenizer

_WORDS = ["which", "option", "treats", "the", "heart", "lung", "fever", "pain", "a", "b", "c", "d", "?", ":"]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def save_base(folder: Path, layers: int, dtype: torch.dtype) -> int:
    """The Llama-shaped base with random weights, saved as safetensors with its tokenizer; its parameter count."""
    tokenizer = word_tokenizer(_WORDS)
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # built in the saved dtype: a bf16 base never exists in fp32 here
    try:
        config = LlamaConfig(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=layers,
            num_attention_heads=32,
            num_key_value_heads=4,
            max_position_embeddings=256,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            torch_dtype=dtype,
        )
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="2GB")
    tokenizer.save_pretrained(folder)
    del model
    return params


def _instructions(path: Path, count: int, seed: int) -> Path:
    topics = _WORDS[4:8]
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
    params = save_base(base, args.layers, _DTYPES[args.dtype])
    base_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    print(f"base: {params / 1e9:.2f}B parameters, {base_bytes / 2**30:.2f} GiB, {time.monotonic() - started:.0f}s")
    data_dir = work / "c"
    coordinator = _start(
        ["-m", "coordinator", "serve", "--address", "127.0.0.1:0", "--data-dir", str(data_dir)],
        work / "coordinator.log",
    )
    agents: list[subprocess.Popen[str]] = []
    peaks: dict[int, int] = {}
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
            }
            if args.ranks > 1:
                settings["devices"] = ["cpu"] * args.ranks
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
                    peaks[index] = max(peaks.get(index, 0), _tree_kib(agent.pid))
                time.sleep(0.5)
        silo_peak_kib = [max(peaks.get(i, 0), memory_kib(agent.pid, "VmHWM")) for i, agent in enumerate(agents)]
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
        "params": params,
        "dtype": args.dtype,
        "layers": args.layers,
        "lora_rank": args.rank,
        "silos": args.silos,
        "ranks_per_silo": args.ranks,
        "samples_per_silo": args.samples,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "base_bytes": base_bytes,
        "round_s": rounds,
        "upload_bytes": uploads,
        "upload_vs_base": max(uploads) / base_bytes,
        "silo_peak_rss_gib": [kib / 2**20 for kib in silo_peak_kib],
        "coordinator_peak_rss_mib": coordinator_peak_kib / 1024,
    }


def _tree_kib(pid: int) -> int:
    """RSS of a process and its children now (an agent and the ranks it launched), in KiB."""
    total = memory_kib(pid, "VmRSS")
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        for child_pid in child.read_text().split():
            try:
                total += memory_kib(int(child_pid), "VmRSS")
            except (OSError, RuntimeError):
                continue  # it ended meanwhile
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--layers", type=int, default=22, help="decoder layers (22: 1.1B parameters)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="the saved base's weights")
    parser.add_argument("--silos", type=int, default=1)
    parser.add_argument("--ranks", type=int, default=1, help="CPU ranks per silo (silo.yaml devices)")
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
