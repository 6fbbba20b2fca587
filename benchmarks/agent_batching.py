"""Generated tokens/s of concurrent two-turn agent episodes: continuous batching against one episode at a time.

    python benchmarks/agent_batching.py [--episodes 64] [--threads 1] [--max-new-tokens 16] [--env-ms 5 15]
                                        [--greedy] [--tag NAME]

Every mode runs the same episodes (``AgentLoop`` on a ``FakeTextEnv`` whose steps sleep between the ``--env-ms``
bounds, 5–15 ms by default, varying by episode and turn) on a real ``RolloutWorker`` with an ``HFInferenceEngine``
holding the built-in tiny model at the default config (hidden 128, 4 layers), on ``--threads`` torch threads:

  continuous     all episodes at once; requests batched at every decoding step (the engine's decode sessions);
  one-at-a-time  the same episodes one after the other (each alone in the engine);
  whole-batch    all at once through the request-level ``Batcher`` (a batch decodes to its end; requests that
                 arrive meanwhile wait for it), for reference.

Tokens counted are the model's (the loss-masked tokens of every trajectory); seconds are the wall time of the rollout
calls; tokens/engine-s counts the engine's busy time only (the environment's waits left out). With ``--greedy`` it
also checks that continuous batching produced the one-at-a-time tokens exactly. Prints a table and writes
benchmarks/results/agent_batching[_<tag>][_greedy]_<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from rollflow.api import SamplingParams
from rollflow.engines.hf_inference import HFInferenceEngine
from rollflow.engines.models import TinyModelSpec, char_tokenizer, tiny_model
from rollflow.runtime.rollout import RolloutWorker
from rollflow.runtime.weights import InlineWeightTransport
from rollflow.testing import FakeTextEnv
from rollflow.workflows import AgentLoop, Tokens

ALPHABET = "0123456789+="
MODES = ("continuous", "one-at-a-time", "whole-batch")


class WholeBatches:
    """The engine without its decode sessions, so the worker batches whole requests (the ``Batcher``)."""

    def __init__(self, engine: HFInferenceEngine) -> None:
        self.engine, self.model, self.generator = engine, engine.model, engine.generator

    @property
    def version(self) -> int:
        return self.engine.version

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Any]:
        return self.engine.generate(prompt_ids, params)

    def load_weights(self, weights: Any) -> None:
        self.engine.load_weights(weights)


def make_env(low_ms: float, high_ms: float) -> FakeTextEnv:
    def seconds(task: int, turn: int) -> float:  # spread over [low, high], different for every episode and turn
        return (low_ms + (high_ms - low_ms) * ((task * 7 + turn * 3) % 11) / 10) / 1000

    return FakeTextEnv(turns=2, durations=seconds, observe=lambda task, turn, action: f"={turn}",
                       prompt=lambda task: f"{task % 97}+{task * 13 % 89}=")


def run_mode(mode: str, args: argparse.Namespace, tokenizer: Any, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    model = tiny_model(TinyModelSpec(), tokenizer, seed=0)
    model.load_state_dict(state)
    engine = HFInferenceEngine(model, tokenizer, seed=args.seed)
    params = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, greedy=args.greedy)
    workflow = AgentLoop(lambda: make_env(*args.env_ms), Tokens(tokenizer), max_turns=2)
    worker = RolloutWorker(WholeBatches(engine) if mode == "whole-batch" else engine, InlineWeightTransport(), workflow,
                           params, threads=args.threads, max_batch=256)
    worker.executor.submit(engine.generate, [[1, 4, 5]], params).result()  # warm-up, on the engine thread
    items = list(enumerate(range(args.episodes)))

    async def episodes() -> list[Any]:
        if mode == "one-at-a-time":
            return [await worker.rollout([item]) for item in items]
        return [await worker.rollout(items)]

    started = time.perf_counter()
    outputs = asyncio.run(episodes())
    seconds = time.perf_counter() - started
    worker.executor.shutdown()
    trajectories = [p.value.payload for out in outputs for p in out.values]
    spans = [s for out in outputs for s in out.spans if s.name == "generate"]
    tokens = sum(sum(t.loss_mask) for t in trajectories)
    steps = sum(s.meta.get("steps", 0) for s in spans)
    engine_seconds = sum(s.end - s.start for s in spans)  # spans of one engine thread never overlap
    return {"mode": mode, "episodes": len(trajectories), "tokens": tokens, "seconds": seconds,
            "tokens_per_second": tokens / seconds, "engine_seconds": engine_seconds,
            "tokens_per_engine_second": tokens / engine_seconds, "engine_calls": len(spans),
            "rows_per_step": tokens / steps if steps else None,
            "statuses": sorted({t.status.value for t in trajectories}),
            "_tokens": [t.tokens for t in trajectories]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--env-ms", nargs=2, type=float, default=[5.0, 15.0], metavar=("LOW", "HIGH"),
                        help="an environment step sleeps between these bounds (milliseconds)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the engine (and of this process)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (and check continuous = one-at-a-time)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--tag", default="", help="added to the JSON file's name")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = char_tokenizer(ALPHABET)
    state = tiny_model(TinyModelSpec(), tokenizer, seed=args.seed).state_dict()
    runs = [run_mode(mode, args, tokenizer, state) for mode in args.modes]
    alone = next((r for r in runs if r["mode"] == "one-at-a-time"), None)
    for r in runs:
        r["speedup"] = r["tokens_per_second"] / alone["tokens_per_second"] if alone else None
    same = None
    if args.greedy and alone and any(r["mode"] == "continuous" for r in runs):
        same = next(r for r in runs if r["mode"] == "continuous")["_tokens"] == alone["_tokens"]
    for r in runs:
        del r["_tokens"]

    table = Table(title=f"{args.episodes} two-turn episodes, {args.max_new_tokens} new tokens a turn, env steps "
                        f"{args.env_ms[0]:g}–{args.env_ms[1]:g} ms, {'greedy' if args.greedy else 'sampled'}, "
                        f"{args.threads} torch thread(s)")
    for col in ("mode", "tokens", "seconds", "tokens/s", "speedup", "tok/engine-s", "calls", "rows/step"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in runs:
        table.add_row(r["mode"], str(r["tokens"]), f"{r['seconds']:.2f}", f"{r['tokens_per_second']:.0f}",
                      f"{r['speedup']:.1f}" if r["speedup"] else "", f"{r['tokens_per_engine_second']:.0f}",
                      str(r["engine_calls"]),
                      f"{r['rows_per_step']:.1f}" if r["rows_per_step"] else "")
    Console(width=max(Console().width, 110)).print(table)
    print("speedup: tokens/s over one-at-a-time's; tok/engine-s: tokens over the engine's busy seconds (no environment "
          "waits); calls: engine busy periods (continuous) or batches; rows/step: mean rows per decoding step")
    if same is not None:
        print(f"continuous batching produced the one-at-a-time tokens exactly: {same}")

    args.out.mkdir(parents=True, exist_ok=True)
    tag = "".join(f"_{t}" for t in (args.tag, "greedy" if args.greedy else "") if t)
    path = args.out / f"agent_batching{tag}_{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps({
        "episodes": args.episodes, "max_new_tokens": args.max_new_tokens, "env_ms": args.env_ms, "threads": args.threads,
        "greedy": args.greedy, "seed": args.seed, "model": "built-in tiny Qwen2, hidden 128, 4 layers",
        "cpus": os.cpu_count(), "machine": platform.platform(), "torch": torch.__version__,
        "same_tokens_as_one_at_a_time": same, "runs": runs,
    }, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
