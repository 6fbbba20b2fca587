"""Seconds per SFT step of the default job's model and batch (forward, backward, AdamW), and per generate call.

    python benchmarks/sft_step.py [--steps 30] [--threads 2]

Prints a table and writes benchmarks/results/sft_step_<transformers version>_<date>.json, so two installs (e.g. the
locked set and the newest one, or two transformers releases put first on PYTHONPATH) can be compared in one sitting.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from rich.console import Console
from rich.table import Table
from rollflow.runtime.batch import collate

from rollflow.algos import sft_loss
from rollflow.api import SamplingParams
from rollflow.config import load_config
from rollflow.engines.hf_inference import HFInferenceEngine
from rollflow.engines.models import TinyModelSpec, char_tokenizer, tiny_model
from rollflow.engines.torch_train import TorchTrainEngine
from rollflow.recipes.grpo import Tokens
from rollflow.tasks import build_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = load_config()
    task = build_task(config.task, config.seed)
    tokenizer = char_tokenizer(task.alphabet())
    m = config.model
    model = tiny_model(TinyModelSpec(m.hidden_size, m.layers, m.heads, m.intermediate_size, m.max_positions), tokenizer, 0)
    tokens, stream = Tokens(tokenizer), task.train_problems(1)
    engine = TorchTrainEngine(model, lr=1e-3)

    sft = []
    for _ in range(args.steps + 3):
        problems = [next(stream) for _ in range(config.sft.batch_size)]
        batch = collate([tokens.prompt(p.prompt) for p in problems], [tokens.target(task.reference(p)) for p in problems],
                        tokenizer.pad_token_id)
        t = time.perf_counter()
        engine.train_step(batch, sft_loss)
        sft.append(time.perf_counter() - t)
    sft = sft[3:]  # the first steps warm up allocators and caches

    # The engine passes the KV cache as `cache=`, which transformers < 5.24 does not know: time generation only there.
    gen = [float("nan")]
    if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (5, 24):
        inference = HFInferenceEngine(model, tokenizer, seed=0)
        prompts = [tokens.prompt(next(stream).prompt) for _ in range(config.samples_per_step)]
        params = SamplingParams(max_new_tokens=config.rollout.max_new_tokens)
        gen = []
        for _ in range(max(3, args.steps // 5) + 1):
            t = time.perf_counter()
            inference.generate(prompts, params)
            gen.append(time.perf_counter() - t)
        gen = gen[1:]

    row = {
        "transformers": transformers.__version__, "torch": torch.__version__, "threads": args.threads,
        "sft_batch": config.sft.batch_size, "sft_step_median_s": statistics.median(sft), "sft_step_min_s": min(sft),
        "generate_samples": config.samples_per_step, "generate_median_s": statistics.median(gen), "generate_min_s": min(gen),
    }
    table = Table(title="SFT step and generate call, default job's model")
    table.add_column("")
    table.add_column("value", justify="right")
    for k, v in row.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    Console().print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"sft_step_{transformers.__version__}_{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps({"machine": platform.platform(), **row}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
