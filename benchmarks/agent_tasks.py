"""The built-in agent tasks over several seeds: held-out success after SFT and after RL; and, on `program`, the
paper's headline at our scale: the RL-trained default model against a model with >= 4x its parameters trained by
SFT alone on the same demonstrations.

    python benchmarks/agent_tasks.py --seeds 0 1 2 [--tasks program guess] [--tag NAME] [key.sub=value ...]

Prints a table and writes benchmarks/results/agent_tasks_<date>[_NAME].json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

from rich.console import Console
from rich.table import Table

import rollflow
from rollflow.engines.models import TinyModelSpec, char_tokenizer, tiny_model
from rollflow.tasks import build_task

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "agents"
# twice the default's width, a wider MLP: 4.2x the default's parameters (256/1024 would be 3.99x)
LARGE = ["model.hidden_size=256", "model.intermediate_size=1088"]


def parameters(config: rollflow.Config) -> int:
    m = config.model
    tokenizer = char_tokenizer(build_task(config.task).alphabet())
    model = tiny_model(TinyModelSpec(m.hidden_size, m.layers, m.heads, m.intermediate_size, m.max_positions), tokenizer, 0)
    return sum(p.numel() for p in model.parameters())


def run(task: str, seed: int, overrides: list[str], name: str) -> dict:
    config = rollflow.load_config(str(CONFIGS / f"{task}.yaml"), [
        *overrides, f"seed={seed}", f"run_dir=runs/bench_agents/{task}_{name}_seed{seed}", "progress=false"])
    result = rollflow.train(config, overwrite=True)
    s = result.summary
    return {"task": task, "model": name, "seed": seed, "parameters": parameters(config),
            "after_sft": s["accuracy_after_sft"], "final": s["accuracy_final"], "best": s["accuracy_best"],
            "gain": s["accuracy_final"] - s["accuracy_after_sft"], "wall_seconds": s["wall_seconds"],
            "rl_seconds": s["rl_seconds"], "samples_per_second": s["samples_per_second"],
            "eval_curve": [(h["step"], h["eval/accuracy"]) for h in result.history if "eval/accuracy" in h]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=["program", "guess"], choices=["program", "guess"])
    parser.add_argument("--no-large", action="store_true", help="skip the SFT-only large model on program")
    parser.add_argument("--only-large", action="store_true", help="run only the SFT-only large model on program")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--tag", default="", help="suffix of the result file's name")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    default = {task: parameters(rollflow.load_config(str(CONFIGS / f"{task}.yaml"), args.overrides)) for task in args.tasks}
    runs = []
    for task in args.tasks:
        for seed in args.seeds:
            if not args.only_large:
                runs.append(run(task, seed, args.overrides, "default+RL"))
            if task == "program" and not args.no_large:  # same demonstrations, same SFT steps, no RL
                runs.append(run(task, seed, [*args.overrides, *LARGE, "train.steps=0"], "4x+SFT only"))

    table = Table(title="agent tasks: held-out success")
    for col in ("task", "model", "params", "seed", "after SFT", "final", "gain", "wall s", "RL s"):
        table.add_column(col, justify="right")
    for r in runs:
        r["parameters_vs_default"] = r["parameters"] / default[r["task"]]
    for r in runs:
        table.add_row(r["task"], r["model"], f"{r['parameters'] / 1e6:.2f}M ({r['parameters_vs_default']:.2f}x)", str(r["seed"]), f"{r['after_sft']:.3f}",
                      f"{r['final']:.3f}", f"{r['gain']:+.3f}", f"{r['wall_seconds']:.0f}", f"{r['rl_seconds']:.0f}")
    Console().print(table)

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"agent_tasks_{datetime.date.today().isoformat()}{'_' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps({"overrides": args.overrides, "machine": platform.platform(), "runs": runs}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
