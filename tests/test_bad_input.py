"""What a user sees for each kind of bad input: through ``rollflow.cli.main`` as they would type it, exit code 2 and
one ``rollflow: <message>`` naming what was wrong, where (file, line, key, row, sample) and what to do."""

import json
import os
import re

import datasets
import pytest

from rollflow.cli import main

TINY = [
    "model.hidden_size=16", "model.layers=1", "model.heads=2", "model.intermediate_size=32",
    "sft.steps=0", "train.steps=1", "rollout.groups_per_step=2", "rollout.group_size=2", "eval.every=0",
    "runtime.backend=inline", "runtime.staleness=0", "progress=false", "runtime.torch_threads=1", "sft.torch_threads=1",
]
ROWS = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(8)]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def fails(capsys, *args):
    """Run the CLI; assert it refused the input (exit 2, nothing on stdout); return the message after 'rollflow: '."""
    code = main(list(args))
    out, err = capsys.readouterr()
    assert code == 2, (code, err)
    assert err.startswith("rollflow: "), err
    return err.removeprefix("rollflow: ")


def train(capsys, *args):
    return fails(capsys, "train", *TINY, "run_dir=run", *args)


def file_task(path, *more):
    return ("task.name=file", f"task.path={path}", *more)


def write_rows(name, rows):
    with open(name, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return name


def write(name, text):
    with open(name, "w") as f:
        f.write(text)
    return name


# -- the config ---------------------------------------------------------------------------------------------------
def test_malformed_yaml_names_the_file_line_and_column(capsys):
    write("run.yaml", "train:\n  steps: 3\n  lr: [1e-3, 2e-3\nseed: 1\n")
    msg = fails(capsys, "config", "run.yaml")
    assert msg.startswith("config file 'run.yaml' is not valid YAML: line 4, column 5: expected ',' or ']', but got ':'")
    assert "(while parsing a flow sequence at line 3, column 7)" in msg
    assert "seed: 1" in msg  # the offending line is quoted
    assert "<unicode string>" not in msg  # PyYAML's own name for the text it was given


def test_a_key_given_twice_in_the_yaml_is_refused(capsys):
    write("run.yaml", "train:\n  steps: 3\nseed: 1\ntrain:\n  lr: 0.1\n")
    msg = fails(capsys, "config", "run.yaml")
    assert msg == ("config file 'run.yaml': key 'train' is given twice in one mapping (lines 1 and 4); YAML would "
                   "silently keep only the last: merge them into one\n")


def test_a_config_path_that_is_a_directory(capsys):
    os.mkdir("configs")
    assert fails(capsys, "config", "configs") == "config file 'configs' is a directory; give the YAML file inside it\n"


def test_a_missing_config_file(capsys, tmp_path):
    assert fails(capsys, "train", "nope.yaml") == (f"config file 'nope.yaml' does not exist (a relative path is read "
                                                   f"from the working directory '{tmp_path}'); check the path\n")


def test_unknown_key_suggests_the_close_one(capsys):
    assert fails(capsys, "train", "train.stpes=3") == "invalid config:\n  - unknown key 'train.stpes'; did you mean 'train.steps'?\n"


def test_mistyped_value_names_the_key_and_the_value(capsys):
    msg = fails(capsys, "train", "train.steps=three")
    assert msg == "invalid config:\n  - train.steps: Input should be a valid integer, unable to parse string as an integer (got 'three')\n"


def test_out_of_range_value_names_the_key_the_bound_and_the_value(capsys):
    msg = fails(capsys, "train", "rollout.top_p=1.5")
    assert msg == "invalid config:\n  - rollout.top_p: Input should be less than or equal to 1 (got 1.5)\n"


def test_a_value_from_a_yaml_file_is_checked_like_an_override(capsys):
    write("run.yaml", "runtime:\n  backend: rayy\n")
    msg = fails(capsys, "train", "run.yaml")
    assert msg == "invalid config:\n  - runtime.backend: Input should be 'inline' or 'ray' (got 'rayy')\n"


@pytest.mark.parametrize("value", ["inf", ".inf", "1e999"])
def test_infinite_numbers_are_refused(capsys, value):
    write("run.yaml", f"algo:\n  entropy_coef: {value}\n")  # bounded below only: pydantic alone lets infinity through
    msg = fails(capsys, "train", "run.yaml")
    assert msg == ("invalid config:\n  - algo.entropy_coef: must be a finite number (got inf); give a number, or null "
                   "where the key allows it\n")


def test_an_interpolation_that_cannot_be_resolved(capsys):
    msg = fails(capsys, "train", "train.lr=${optim.lr}")
    assert msg.startswith("train.lr: cannot resolve the interpolation in it (InterpolationKeyError: Interpolation key "
                          "'optim.lr' not found); fix the ${...} reference or give a plain value")


def test_several_problems_are_reported_together(capsys):
    write("run.yaml", "train:\n  lr: .inf\n")
    msg = fails(capsys, "train", "run.yaml", "train.stpes=3", "rollout.top_p=1.5")
    assert msg.splitlines()[1:] == [
        "  - rollout.top_p: Input should be less than or equal to 1 (got 1.5)",
        "  - train.lr: must be a finite number (got inf); give a number, or null where the key allows it",
        "  - unknown key 'train.stpes'; did you mean 'train.steps'?",
    ]


# -- the data file ------------------------------------------------------------------------------------------------
def test_a_missing_data_file(capsys, tmp_path):
    msg = train(capsys, *file_task("data/train.jsonl"))
    assert msg == (f"task.path: file 'data/train.jsonl' does not exist (a relative path is read from the working "
                   f"directory {str(tmp_path)!r}); fix task.path\n")


def test_an_empty_data_file(capsys):
    write("train.jsonl", "\n\n")
    assert train(capsys, *file_task("train.jsonl")) == "task.path: file 'train.jsonl' is empty; it needs one problem per row\n"


def test_a_jsonl_file_with_a_broken_line_names_the_line(capsys):
    lines = [json.dumps(r) for r in ROWS]
    lines[4] = lines[4].replace('", "answer"', '" "answer"')  # a missing comma on line 5: {"prompt": "4+1=" "answer"
    write("train.jsonl", "\n".join(lines) + "\n")
    msg = train(capsys, *file_task("train.jsonl"))
    assert msg == ("task.path: cannot read 'train.jsonl' as jsonl: line 5, column 19 is not valid JSON "
                   "(Expecting ',' delimiter); fix that line\n")


def test_a_parquet_file_that_is_not_parquet(capsys):
    write_rows("train.parquet", ROWS)  # JSON lines under a .parquet name
    msg = train(capsys, *file_task("train.parquet"))
    assert msg.startswith("task.path: cannot read 'train.parquet' as parquet (ArrowInvalid: ")
    assert "magic bytes" in msg
    assert msg.endswith("; check that it is a valid parquet file\n")


def test_a_file_without_the_answer_column_lists_the_columns_it_has(capsys):
    write_rows("train.jsonl", [{"question": r["prompt"], "solution": r["answer"]} for r in ROWS])
    msg = train(capsys, *file_task("train.jsonl", "task.prompt_column=question"))
    assert msg == ("task.path: file 'train.jsonl' has no column 'answer' (its columns: ['question', 'solution']); "
                   "set task.answer_column to the column that holds the answers\n")


@pytest.mark.parametrize("column", ["prompt", "answer"])
def test_a_row_missing_its_prompt_or_answer_names_the_row_and_its_fields(capsys, column):
    rows = [dict(r, id=i) for i, r in enumerate(ROWS)]
    del rows[5][column]
    write_rows("train.jsonl", rows)
    msg = train(capsys, *file_task("train.jsonl"))
    other = "answer" if column == "prompt" else "prompt"
    assert msg.startswith(f"task.path: file 'train.jsonl', row 6: {column} must be a non-empty string")
    assert msg.endswith(f"got None (this row has no '{column}'; its fields: ['{other}', 'id']); add it to the row, "
                        f"or set task.{column}_column if the column has another name\n")


def test_an_eval_file_is_named_as_such(capsys):
    write_rows("train.jsonl", ROWS)
    write("eval.jsonl", '{"prompt": "1+1=", "answer": "2"}\n{"prompt": \n')
    msg = train(capsys, *file_task("train.jsonl", "task.eval_path=eval.jsonl"))
    assert msg.startswith("task.eval_path: cannot read 'eval.jsonl' as jsonl: line 2, column 12 is not valid JSON")


# -- the reward function ------------------------------------------------------------------------------------------
def test_a_reward_module_that_cannot_be_imported(capsys, tmp_path):
    write_rows("train.jsonl", ROWS)
    msg = train(capsys, *file_task("train.jsonl", "task.reward_fn=my_rewards:score"))
    assert msg.startswith("reward fn 'my_rewards:score': cannot import module 'my_rewards' (ModuleNotFoundError: "
                          "No module named 'my_rewards'); make it importable (put it in the working directory "
                          f"{str(tmp_path)!r}")


def test_a_reward_file_that_fails_to_import(capsys, tmp_path):
    write_rows("train.jsonl", ROWS)
    write("reward.py", "import no_such_package_xyz\n\ndef score(problem, response):\n    return 1.0\n")
    msg = train(capsys, *file_task("train.jsonl", "task.reward_fn=reward.py:score"))
    assert msg == (f"reward fn 'reward.py:score': executing {str(tmp_path / 'reward.py')!r} raised "
                   "ModuleNotFoundError: No module named 'no_such_package_xyz'; fix the file\n")


def test_a_reward_function_that_is_misspelt(capsys):
    write_rows("train.jsonl", ROWS)
    write("reward.py", "def score(problem, response):\n    return 1.0\n")
    msg = train(capsys, *file_task("train.jsonl", "task.reward_fn=reward.py:scroe"))
    assert msg == "reward fn 'reward.py:scroe': module 'reward.py' has no attribute 'scroe'; did you mean 'score'?\n"


def test_a_reward_that_raises_names_the_sample_and_where_it_raised(capsys, tmp_path):
    write_rows("train.jsonl", ROWS)
    write("reward.py", "def score(problem, response):\n    return problem.meta['weight']\n")
    msg = train(capsys, *file_task("train.jsonl", "task.reward_fn=reward.py:score"))
    assert re.fullmatch(r"reward fn 'reward\.py:score' raised KeyError on sample 0: 'weight' \(checked before training: "
                        r"the first training problem, its reference answer as the response\); "
                        rf"raised at {re.escape(str(tmp_path / 'reward.py'))}:2 in score, "
                        r"on prompt '\d\+1=', answer '\d', response '\d'\n", msg), msg


@pytest.mark.parametrize("value, problem", [
    ("'1.0'", "returned str on sample 0; expected a float, int, bool or RewardResult"),
    ("None", "returned NoneType on sample 0; expected a float, int, bool or RewardResult"),
    ("float('nan')", "returned a reward of nan on sample 0; rewards must be finite numbers"),
])
def test_a_reward_that_returns_something_unusable(capsys, value, problem):
    write_rows("train.jsonl", ROWS)
    write("reward.py", f"def score(problem, response):\n    return {value}\n")
    msg = train(capsys, *file_task("train.jsonl", "task.reward_fn=reward.py:score"))
    assert re.fullmatch(rf"reward fn 'reward\.py:score' {re.escape(problem)} \(checked before training: the first "
                        r"training problem, its reference answer as the response\); "
                        r"the sample: prompt '\d\+1=', answer '\d', response '\d'\n", msg), msg


def test_a_reward_that_raises_mid_run_stops_it_naming_the_sample(capsys, tmp_path):
    """The check before training passes (the reference answer scores); the untrained model's answers do not."""
    write_rows("train.jsonl", ROWS)
    write("reward.py", "def score(problem, response):\n"
                       "    if response != problem.answer:\n"
                       "        raise ValueError(f'cannot parse {response!r}')\n"
                       "    return 1.0\n")
    msg = train(capsys, *file_task("train.jsonl", "task.reward_fn=reward.py:score"))
    assert re.fullmatch(r"reward fn 'reward\.py:score' raised ValueError on sample [1-4]: cannot parse '(.*)'; "
                        rf"raised at {re.escape(str(tmp_path / 'reward.py'))}:3 in score, "
                        r"on prompt '\d\+1=', answer '\d', response '(.*)'\n", msg), msg


# -- the model ----------------------------------------------------------------------------------------------------
def test_a_model_path_that_is_not_a_checkpoint(capsys, tmp_path):
    (tmp_path / "my-model").mkdir()
    (tmp_path / "my-model" / "weights.bin").write_bytes(b"\0")
    msg = train(capsys, "model.path=my-model")
    assert msg == ("model.path='my-model' is not a Hugging Face checkpoint directory (no config.json); give a folder "
                   "written by save_pretrained, or leave model.path unset for the built-in tiny model\n")


def test_a_model_path_with_a_broken_config_or_no_tokenizer(capsys, tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "qwen2", ')  # cut off
    msg = train(capsys, "model.path=broken")
    assert msg.startswith("model.path='broken' holds no loadable tokenizer (") and "save_pretrained" in msg
