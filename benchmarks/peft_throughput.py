"""LoRA / QLoRA training through fedmeki against a plain PEFT loop: tokens per second and peak memory, same run.

    python -m benchmarks.peft_throughput --shape 7b [--quantization 4bit]     (a CUDA GPU: scripts/gpu-check)
    python -m benchmarks.peft_throughput --shape tiny                         (the CPU; CI runs it)
    (or: fedmeki bench peft ...)

Builds a Llama-shaped base from a LlamaConfig (benchmarks/bases.py: `7b` is Llama-2-7B's shape) with random
weights and saves it as a hospital's folder. Then (1) one round through a real coordinator and a silo agent (on
loopback, in this process, the agent mapping the folder in its `models`): the job trains LoRA (r 16 on q_proj and
v_proj) for `--steps` steps of `--batch-size` instructions of exactly `--max-length` tokens; (2) a plain PEFT loop
(transformers + peft + torch.optim.Adam, nothing of fedmeki's) on the same folder, batch, sequence length, steps,
learning rate, precision and quantisation. Tokens per second of each are over the steps after the first (its
warm-up), timed at each optimiser step, synchronised with the device; the ratio is fedmeki's over the plain
loop's (the issue's target: >= 0.95). Peak memory of each: torch.cuda.max_memory_allocated on CUDA, the process's
peak RSS on the CPU (reset between the two). Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from benchmarks.bases import DTYPES, LLAMA_SHAPES, WORDS, save_llama
from benchmarks.memory import memory_kib
from benchmarks.scratch import scratch
from coordinator.server import Coordinator
from coordinator.settings import CoordinatorSettings
from fedmeki_core.client import FedmekiClient
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.models.pretrained import load_tokenizer
from fedmeki_core.tasks.instructions import read_instructions, tokenize_instructions
from silo_agent.agent import SiloAgent
from silo_agent.settings import SiloSettings
from silo_agent.state import AgentState
from silo_agent.trainer import LocalTrainer
from silo_agent.transport import GrpcTransport

# Per shape: batch, sequence length, steps (the defaults; each is an argument).
_DEFAULTS = {"7b": (4, 512, 12), "1.1b": (4, 256, 12), "tiny": (4, 64, 6)}
_TARGETS = ["q_proj", "v_proj"]


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def peak_memory(device: torch.device, into: dict[str, int], key: str) -> Iterator[None]:
    """Peak bytes while the block runs: allocated on the CUDA device, or this process's RSS (Linux)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current RSS
    yield
    if device.type == "cuda":
        into[key] = int(torch.cuda.max_memory_allocated(device))
    else:
        into[key] = memory_kib(os.getpid(), "VmHWM") * 1024


def write_instructions(path: Path, count: int, max_length: int) -> Path:
    """Instructions whose prompt alone is longer than `max_length` words: each row is cut to exactly max_length
    tokens (the prompt keeps its end, the answer whole), so every batch has batch x max_length tokens."""
    prompt = " ".join(WORDS[i % len(WORDS)] for i in range(max_length + 8))
    lines = [{"instruction": prompt, "input": "", "output": "abcd"[i % 4]} for i in range(count)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _tokens_per_s(times: list[float], tokens_per_step: int) -> float:
    """Over the steps after the first: `times` are the ends of the steps."""
    if len(times) < 3:
        raise RuntimeError(f"{len(times)} steps timed: at least 3 are needed (the first is a warm-up)")
    return (len(times) - 1) * tokens_per_step / (times[-1] - times[0])


def through_fedmeki(work: Path, base: Path, data: Path, args: argparse.Namespace, device: torch.device) -> list[float]:
    """One LoRA round of a job through a coordinator and a silo agent; the end time of each optimiser step."""
    coordinator = Coordinator(CoordinatorSettings(address="127.0.0.1:0", data_dir=work / "coordinator"))
    coordinator.start()
    address = f"127.0.0.1:{coordinator.port}"
    try:
        _, token = coordinator.registry.add("hospital", "trainer")
        settings = SiloSettings(
            coordinator=address,
            work_dir=work / "silo",
            device=str(device),
            data={"instructions": data},
            models={"llama": base},
            poll_wait_seconds=0.2,
            holdout_fraction=args.batch_size / ((args.steps + 1) * args.batch_size),  # one batch held out
        )
        trainer = LocalTrainer.from_settings(settings)
        transport = GrpcTransport(address, coordinator.registry.enroll(token).credential)
        agent = SiloAgent(settings, transport, AgentState(settings.work_dir), trainer)
        times: list[float] = []
        count_step: Callable[[int], None] = trainer.on_step

        def timed(step: int) -> None:
            _synchronise(device)
            times.append(time.perf_counter())
            count_step(step)

        trainer.on_step = timed
        model: dict[str, Any] = {
            "architecture": "causal-lm",
            "pretrained": "llama",
            "config": {"max_length": args.max_length},
            "lora": {"rank": args.rank, "alpha": 2 * args.rank, "target_modules": _TARGETS},
            "quantization": args.quantization,
        }
        spec = {
            "name": "peft-throughput",
            "task": "instructions",
            "rounds": 1,
            "min_silos": 1,
            "round_deadline_seconds": 3600,
            "algorithm": {"batch_size": args.batch_size, "learning_rate": args.learning_rate, "local_epochs": 1},
            "model": model,
        }
        with FedmekiClient(address) as client:
            job = client.submit_job(parse_job_spec(spec), base=base)
            while not (final := client.get_job(job.id)).state.finished:
                agent.run_once()
        transport.close()
    finally:
        coordinator.stop(grace=0)
    if final.state.value != "completed":
        raise RuntimeError(f"the job ended {final.state.value}: {final.reason}")
    return times


def plain_peft(base: Path, data: Path, args: argparse.Namespace, device: torch.device) -> list[float]:
    """The same training as a plain transformers + peft loop; the end time of each optimiser step."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    examples = read_instructions(data)[: args.steps * args.batch_size]
    tokens = tokenize_instructions(examples, load_tokenizer(base), args.max_length)
    ids = torch.from_numpy(tokens.features).long().to(device)
    positions = torch.arange(args.max_length, device=device).unsqueeze(0)
    labels = torch.where(positions >= torch.from_numpy(tokens.labels).to(device).unsqueeze(1), ids, -100)
    if args.quantization == "4bit":
        quantization = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
        loaded = AutoModelForCausalLM.from_pretrained(base, quantization_config=quantization, device_map={"": device})
        loaded = prepare_model_for_kbit_training(loaded)  # type: ignore[no-untyped-call]
    else:
        loaded = AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[args.dtype])
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=_TARGETS)
    model = get_peft_model(loaded, config)
    if args.quantization != "4bit":  # a 4-bit base is placed as it is quantised
        model.to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()  # as the silo's mixed_precision auto
    model.train()
    times = []
    for start in range(0, len(ids), args.batch_size):
        batch = slice(start, start + args.batch_size)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids[batch], labels=labels[batch]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        float(loss.detach())  # as a loop that logs its loss (fedmeki's does)
        _synchronise(device)
        times.append(time.perf_counter())
    return times


def run(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    device = _device()
    base = work / "base"
    started = time.monotonic()
    params = save_llama(base, args.shape, DTYPES[args.dtype], max_length=args.max_length)
    print(f"base {args.shape}: {params:,} parameters ({args.dtype}) in {time.monotonic() - started:.0f}s")
    data = write_instructions(work / "cards.jsonl", (args.steps + 1) * args.batch_size, args.max_length)
    peaks: dict[str, int] = {}
    with peak_memory(device, peaks, "fedmeki"):
        ours = through_fedmeki(work, base, data, args, device)
    if len(ours) != args.steps:
        raise RuntimeError(f"the silo trained {len(ours)} steps, not {args.steps}")
    with peak_memory(device, peaks, "peft"):
        theirs = plain_peft(base, data, args, device)
    tokens_per_step = args.batch_size * args.max_length
    rates = {"fedmeki": _tokens_per_s(ours, tokens_per_step), "peft": _tokens_per_s(theirs, tokens_per_step)}
    return {
        "shape": args.shape,
        "params": params,
        "dtype": args.dtype,
        "quantization": args.quantization,
        "lora_rank": args.rank,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "steps": args.steps,
        "tokens_per_s": rates,
        "ratio": rates["fedmeki"] / rates["peft"],
        "peak_memory": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS",
        "peak_memory_bytes": peaks,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.peft_throughput", description=__doc__)
    parser.add_argument("--shape", choices=sorted(LLAMA_SHAPES), required=True, help="7b on a GPU, tiny on a CPU")
    parser.add_argument("--quantization", choices=["none", "4bit"], default="none", help="4bit: QLoRA (NF4)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="the saved base (default: bf16 on CUDA, else fp32)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (q_proj, v_proj)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-length", type=int, help="tokens per instruction")
    parser.add_argument("--steps", type=int, help="optimiser steps of each (the first is a warm-up)")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    args = parser.parse_args(argv)
    batch, length, steps = _DEFAULTS[args.shape]
    args.batch_size, args.max_length, args.steps = (
        args.batch_size or batch,
        args.max_length or length,
        args.steps or steps,
    )
    args.dtype = args.dtype or ("bf16" if torch.cuda.is_available() else "fp32")
    if args.steps < 3:
        parser.error("--steps: at least 3 (the first is a warm-up)")
    if args.quantization == "4bit" and not torch.cuda.is_available():
        parser.error("--quantization 4bit (QLoRA) needs a CUDA device; this machine has none")
    if args.quantization == "4bit" and importlib.util.find_spec("bitsandbytes") is None:
        parser.error("--quantization 4bit (QLoRA) needs bitsandbytes, which is not installed here")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with scratch("fedmeki-bench-peft-") as work:
        result = run(work, args)
    rates, peaks = result["tokens_per_s"], result["peak_memory_bytes"]
    print(
        f"{args.shape} {args.quantization} on {result['device']}: fedmeki {rates['fedmeki']:.0f} tokens/s, "
        f"plain PEFT {rates['peft']:.0f} tokens/s, ratio {result['ratio']:.3f}; {result['peak_memory']}: "
        f"fedmeki {peaks['fedmeki'] / 2**30:.2f} GiB, plain PEFT {peaks['peft'] / 2**30:.2f} GiB"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
