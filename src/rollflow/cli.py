"""``rollflow train [CONFIG.yaml] [key.sub=value ...]`` and friends."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rollflow.config import ConfigError, load_config


def _split(args: list[str]) -> tuple[str | None, list[str]]:
    """The optional config file is the first argument without '='; the rest are overrides."""
    path = args[0] if args and "=" not in args[0] else None
    return path, args[1:] if path else args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rollflow", description="Reinforcement-learning post-training of language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="run a training job (the built-in default recipe if no config is given)")
    p_train.add_argument("args", nargs="*", metavar="CONFIG.yaml | key.sub=value", help="optional YAML config, then dotted overrides")
    p_train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint, "
                         "with its own config.yaml (overrides may change train.steps, eval.*, checkpoint.*, runtime.*)")
    p_train.add_argument("--overwrite", action="store_true", help="let a new run replace what its run_dir holds")
    p_cfg = sub.add_parser("config", help="print the fully resolved config without running anything")
    p_cfg.add_argument("args", nargs="*", metavar="CONFIG.yaml | key.sub=value")
    p_list = sub.add_parser("list", help="list registered components")
    p_list.add_argument("what", choices=["algos", "tasks"])
    p_ledger = sub.add_parser("ledger", help="check a run's ledger: nothing trained twice, nothing trained unadmitted")
    p_ledger.add_argument("action", choices=["check"])
    p_ledger.add_argument("run_dir", metavar="RUN_DIR")
    p_sandbox = sub.add_parser("sandbox", help="run an untrusted Python file with resource limits and, where Linux "
                               "allows, its own namespaces (no network, a read-only view of the host)")
    p_sandbox.add_argument("action", choices=["run"])
    p_sandbox.add_argument("file", metavar="FILE", help="the Python file to run (a copy runs in a private directory)")
    p_sandbox.add_argument("--timeout", type=float, default=10.0, metavar="S", help="wall-clock seconds (default 10)")
    p_sandbox.add_argument("--json", action="store_true", help="print the result as one JSON object")
    # Flags may sit among the overrides (`train a=1 --overwrite b=2`): argparse leaves what follows a flag unparsed.
    ns, rest = parser.parse_known_args(argv)
    if rest and (getattr(ns, "args", None) is None or any(a.startswith("-") for a in rest)):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if rest:
        ns.args = [*ns.args, *rest]

    if ns.command == "list":
        return _list(ns.what)
    if ns.command == "ledger":
        return _ledger_check(ns.run_dir)
    if ns.command == "sandbox":
        return _sandbox(ns.file, ns.timeout, ns.json)
    path, overrides = _split(ns.args)
    resume = getattr(ns, "resume", None)
    if resume is not None:
        if path is not None:
            print(f"rollflow: --resume reads the run's own {resume}/config.yaml; give only key=value overrides, "
                  f"not {path!r}", file=sys.stderr)
            return 2
        if ns.overwrite:
            print("rollflow: --resume and --overwrite contradict each other; choose one", file=sys.stderr)
            return 2
        path = str(Path(resume) / "config.yaml")
        if not Path(path).is_file():
            print(f"rollflow: cannot resume {resume!r}: no config.yaml there, so it is not a rollflow run directory",
                  file=sys.stderr)
            return 2
        overrides = [*overrides, f"run_dir={resume}"]
    try:
        config = load_config(path, overrides)
    except ConfigError as e:
        print(f"rollflow: {e}", file=sys.stderr)
        return 2
    if ns.command == "config":
        from rollflow.config import dump_config

        print(dump_config(config), end="")
        return 0
    # Defers nothing heavy: `import rollflow` has loaded the recipes, torch and transformers already; Ray is imported
    # only when train builds a Ray backend.
    from rollflow.envs.simulator import EnvSpecError
    from rollflow.recipes import train
    from rollflow.recipes.grpo import NonFiniteLoss, Stopped
    from rollflow.runtime.backend import WorkerStartError
    from rollflow.runtime.checkpoint import RunDirError
    from rollflow.tasks import RewardFnError, TaskDataError

    try:
        train(config, resume=resume is not None, overwrite=ns.command == "train" and ns.overwrite)
    except (TaskDataError, RewardFnError, FileNotFoundError, RunDirError, ConfigError, EnvSpecError) as e:  # the user's input, named in the message
        print(f"rollflow: {_with_notes(e)}", file=sys.stderr)
        return 2
    except (WorkerStartError, NonFiniteLoss) as e:  # one line says it all; a traceback would only show Ray's code
        print(f"rollflow: {e}", file=sys.stderr)
        return 1
    except Stopped as e:
        print(f"rollflow: {e}", file=sys.stderr)
        return 130
    return 0


def _with_notes(e: BaseException) -> str:
    """The message and the notes added on its way up (e.g. where the checkpoint of the finished steps is)."""
    return "\n".join([str(e), *getattr(e, "__notes__", [])])


def _ledger_check(run_dir: str) -> int:
    """Exit 0 when the run's ledger is clean, 1 when it is not, 2 when there is no ledger to read."""
    from pathlib import Path

    from rollflow.runtime.ledger import check

    path = Path(run_dir) / "ledger.jsonl"
    if not path.is_file():
        print(f"rollflow: no ledger at {path}: give the run directory of a rollflow train run", file=sys.stderr)
        return 2
    try:
        report = check(path)
    except ValueError as e:
        print(f"rollflow: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0 if report.clean else 1


def _sandbox(file: str, timeout: float, as_json: bool) -> int:
    """Exit 0 when the program ran ok, 1 when it did not (or the sandbox could not run it), 2 for bad input."""
    import json
    import signal

    from rollflow.envs.sandbox import Sandbox, SandboxError, SandboxLimits

    if not Path(file).is_file():
        print(f"rollflow: no file {file!r} to run in the sandbox", file=sys.stderr)
        return 2
    if not timeout > 0:
        print(f"rollflow: --timeout must be a positive number of seconds, got {timeout}", file=sys.stderr)
        return 2
    try:
        result = Sandbox(SandboxLimits(timeout_s=timeout)).run_file(file)
    except SandboxError as e:
        print(f"rollflow: {e}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(result.to_json()))
    else:
        how = f"exit {result.exit_code}" if result.signal is None else f"signal {signal.Signals(result.signal).name}"
        print(f"{result.status} ({how}) in {result.duration_s:.2f} s, isolation {result.isolation}")
        for name, text in (("stdout", result.stdout), ("stderr", result.stderr)):
            if text:
                print(f"--- {name} ---\n{text}", end="" if text.endswith("\n") else "\n")
    return 0 if result.status == "ok" else 1


def _list(what: str) -> int:
    if what == "tasks":
        from rollflow.tasks import BUILTIN

        for name, cls in BUILTIN.items():
            print(f"{name:10s} {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}")
        return 0
    from rollflow.algos import ADVANTAGES, AGGREGATIONS, CORRECTIONS, KL_ESTIMATORS, POLICY_LOSSES

    for registry in (ADVANTAGES, POLICY_LOSSES, AGGREGATIONS, CORRECTIONS, KL_ESTIMATORS):
        print(f"{registry.kind}:")
        for name, doc in registry.describe().items():
            print(f"  {name:22s} {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
