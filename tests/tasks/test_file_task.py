import itertools
import json
import re
import textwrap

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rollflow.api import Problem, RewardResult, Task
from rollflow.tasks.file_task import FileTask, TaskDataError
from rollflow.tasks.reward_fn import RewardFnError, call_reward_fn, exact_match, load_reward_fn

ROWS = [{"prompt": f"q{i}?", "answer": f"a{i}", "id": i} for i in range(10)]


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    # Keep `datasets`' on-disk cache of these throwaway files out of the user's home.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def write_module(path, source):
    path.write_text(textwrap.dedent(source))
    return str(path)


def first_epoch(task, n_rows):
    """The training rows, read through the public stream: one epoch is every row not held out."""
    return list(itertools.islice(task.train_problems(seed=0), n_rows - len(task.eval_problems())))


# --- loading and splitting -------------------------------------------------------------------------------------


@pytest.mark.parametrize("write, name", [(write_jsonl, "data.jsonl"), (write_parquet, "data.parquet")])
def test_loads_rows_and_splits_off_a_disjoint_eval_set(tmp_path, write, name):
    task = FileTask(write(tmp_path / name, ROWS))
    assert isinstance(task, Task)
    train, held_out = first_epoch(task, 10), task.eval_problems()
    assert len(held_out) == 1  # round(0.1 * 10)
    assert {p.meta["id"] for p in train} | {p.meta["id"] for p in held_out} == set(range(10))
    assert not {p.meta["id"] for p in train} & {p.meta["id"] for p in held_out}
    p = held_out[0]
    assert p == Problem(prompt=f"q{p.meta['id']}?", answer=f"a{p.meta['id']}", meta={"id": p.meta["id"]})
    assert task.reference(p) == p.answer


@pytest.mark.parametrize(
    "answers, texts",
    [
        ([2, 10], ["10", "2"]),
        ([2, 0.5], ["0.5", "2.0"]),  # Arrow reads a mixed int/float column as floats, as the module docstring warns
    ],
)
def test_json_array_file_and_numeric_answers(tmp_path, answers, texts):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"prompt": f"q{i}", "answer": a} for i, a in enumerate(answers)]))
    task = FileTask(str(path))
    assert sorted(p.answer for p in first_epoch(task, 2) + task.eval_problems()) == texts


def test_custom_column_names(tmp_path):
    rows = [{"question": "x?", "solution": "y"}, {"question": "z?", "solution": "w"}]
    task = FileTask(write_jsonl(tmp_path / "d.jsonl", rows), prompt_column="question", answer_column="solution")
    problems = first_epoch(task, 2) + task.eval_problems()
    assert sorted(p.prompt for p in problems) == ["x?", "z?"]
    assert all(p.meta == {} for p in problems)


def test_split_is_seeded(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "answer": "a"} for i in range(50)])

    def eval_of(seed):
        return [p.prompt for p in FileTask(path, eval_fraction=0.2, seed=seed).eval_problems()]

    assert len(eval_of(0)) == 10
    assert eval_of(0) == eval_of(0)
    assert eval_of(0) != eval_of(1)


@pytest.mark.parametrize("fraction, n_eval", [(0.01, 1), (0.99, 1), (0.5, 1)])
def test_split_keeps_at_least_one_row_each_side(tmp_path, fraction, n_eval):
    task = FileTask(write_jsonl(tmp_path / "d.jsonl", ROWS[:2]), eval_fraction=fraction)
    assert len(task.eval_problems()) == n_eval
    assert len({p.prompt for p in first_epoch(task, 2)} | {p.prompt for p in task.eval_problems()}) == 2


def test_eval_path_replaces_the_split(tmp_path):
    eval_rows = [{"prompt": "held?", "answer": "out"}]
    eval_path = write_parquet(tmp_path / "ev.parquet", eval_rows)
    task = FileTask(write_jsonl(tmp_path / "train.jsonl", ROWS), eval_path=eval_path)
    assert sorted(p.meta["id"] for p in itertools.islice(task.train_problems(seed=0), 10)) == list(range(10))
    assert task.eval_problems() == [Problem("held?", "out")]


def test_train_stream_cycles_every_row_per_epoch_in_seeded_order(tmp_path):
    task = FileTask(write_jsonl(tmp_path / "d.jsonl", ROWS))
    stream = [p.prompt for p in itertools.islice(task.train_problems(seed=7), 27)]
    epochs = [stream[0:9], stream[9:18], stream[18:27]]
    train = {r["prompt"] for r in ROWS} - {p.prompt for p in task.eval_problems()}
    assert all(sorted(e) == sorted(train) for e in epochs)
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    assert stream == [p.prompt for p in itertools.islice(task.train_problems(seed=7), 27)]
    assert stream != [p.prompt for p in itertools.islice(task.train_problems(seed=8), 27)]


def test_alphabet_is_every_character_of_train_and_eval(tmp_path):
    rows = [{"prompt": "ab", "answer": "c"}, {"prompt": "Zé", "answer": "!"}]
    task = FileTask(write_jsonl(tmp_path / "d.jsonl", rows))
    assert task.alphabet() == "".join(sorted("abcZé!"))


# --- data errors -------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(TaskDataError, match=r"task\.path: file '.*nope\.jsonl' does not exist"):
        FileTask(str(tmp_path / "nope.jsonl"))


def test_missing_eval_file(tmp_path):
    with pytest.raises(TaskDataError, match=r"task\.eval_path: file '.*nope\.parquet' does not exist"):
        FileTask(write_jsonl(tmp_path / "d.jsonl", ROWS), eval_path=str(tmp_path / "nope.parquet"))


def test_unsupported_extension(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,answer\nq,a\n")
    expected = r"'.*d\.csv' has an unsupported extension; use one of \.jsonl, \.json, \.parquet"
    with pytest.raises(TaskDataError, match=expected):
        FileTask(str(path))


def test_corrupt_jsonl_names_file_line_and_cause(tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "q", "answer": "a"}\n\n{"prompt": "q2",\n{"prompt": "q3", "answer": "c"}\n')
    expected = (r"cannot read '.*d\.jsonl' as jsonl: line 3, column 17 is not valid JSON "
                r"\(Expecting property name enclosed in double quotes\); fix that line$")
    with pytest.raises(TaskDataError, match=expected):
        FileTask(str(path))
    assert not caplog.records  # `datasets`' own log line, which counts rows in a block, is not shown


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "q", "answer": "a"}\n["q2", "b"]\n')
    with pytest.raises(TaskDataError, match=r"as jsonl: line 2 holds a JSON list, not an object"):
        FileTask(str(path))


def test_corrupt_json_array_names_its_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"prompt": "q", "answer": "a"},\n  {"prompt": "q2" "answer": "b"}\n]\n')
    with pytest.raises(TaskDataError, match=r"as json: line 3, column 19 is not valid JSON \(Expecting ',' delimiter\)"):
        FileTask(str(path))


def test_corrupt_parquet_names_file_and_cause(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"not parquet at all")
    expected = r"cannot read '.*d\.parquet' as parquet \(ArrowInvalid: .*magic bytes.*\); check that it is a valid parquet file"
    with pytest.raises(TaskDataError, match=expected):
        FileTask(str(path))


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(TaskDataError, match=r"file '.*d\.jsonl' is empty"):
        FileTask(str(path))


def test_parquet_with_no_rows(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), path)
    with pytest.raises(TaskDataError, match=r"file '.*d\.parquet' is empty"):
        FileTask(str(path))


@pytest.mark.parametrize("name, content", [("d.json", "[]"), ("d.jsonl", "{}\n")])
def test_json_with_no_rows(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TaskDataError, match=rf"file '.*{name}' has no rows"):
        FileTask(str(path))


@pytest.mark.parametrize(
    "kwargs, missing, key",
    [
        ({"prompt_column": "question"}, "question", "task.prompt_column"),
        ({"answer_column": "label"}, "label", "task.answer_column"),
    ],
)
def test_missing_column_names_file_columns_and_config_key(tmp_path, kwargs, missing, key):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    expected = rf"file '.*d\.jsonl' has no column '{missing}' \(its columns: \['prompt', 'answer', 'id'\]\); set {key}"
    with pytest.raises(TaskDataError, match=expected):
        FileTask(path, **kwargs)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt": "", "answer": "a"}, r"row 3: prompt must be a non-empty string, got ''"),
        ({"prompt": "   ", "answer": "a"}, r"row 3: prompt must be a non-empty string"),
        ({"prompt": None, "answer": "a"}, r"row 3: prompt must be a non-empty string, got None"),
        ({"prompt": "q", "answer": None}, r"row 3: answer must be a non-empty string or a number, got None"),
        ({"prompt": "q", "answer": ""}, r"row 3: answer must be a non-empty string or a number, got ''"),
    ],
)
def test_bad_row_names_file_and_row(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], ROWS[1], bad, ROWS[3]])
    with pytest.raises(TaskDataError, match=r"'.*d\.jsonl', " + message):
        FileTask(path)


@pytest.mark.parametrize("column, key", [("prompt", "task.prompt_column"), ("answer", "task.answer_column")])
def test_row_missing_a_field_lists_the_fields_it_has(tmp_path, column, key):
    bad = {k: v for k, v in ROWS[2].items() if k != column}
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], ROWS[1], bad, ROWS[3]])
    fields = [k for k in ROWS[2] if k != column]
    expected = (rf"row 3: {column} must be .*, got None \(this row has no '{column}'; its fields: {re.escape(str(fields))}\); "
                rf"add it to the row, or set {re.escape(key)} if the column has another name")
    with pytest.raises(TaskDataError, match=expected):
        FileTask(path)


def test_data_path_that_is_a_directory(tmp_path):
    with pytest.raises(TaskDataError, match=r"task\.path: '.*' is a directory; give the data file inside it"):
        FileTask(str(tmp_path))


def test_non_string_prompt(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": 12, "answer": "a"}, {"prompt": 13, "answer": "b"}])
    with pytest.raises(TaskDataError, match=r"row 1: prompt must be a non-empty string, got 12"):
        FileTask(path)


def test_list_answer(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "answer": ["a", "b"]}, {"prompt": "r", "answer": ["c"]}])
    with pytest.raises(TaskDataError, match=r"row 1: answer must be a non-empty string or a number, got \['a', 'b'\]"):
        FileTask(path)


def test_single_row_cannot_be_split(tmp_path):
    with pytest.raises(TaskDataError, match=r"only 1 row; .* set task\.eval_path"):
        FileTask(write_jsonl(tmp_path / "d.jsonl", ROWS[:1]))


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_eval_fraction_out_of_range(tmp_path, fraction):
    with pytest.raises(ValueError, match=rf"task\.eval_fraction={fraction} must be strictly between 0 and 1"):
        FileTask(write_jsonl(tmp_path / "d.jsonl", ROWS), eval_fraction=fraction)


# --- reward functions --------------------------------------------------------------------------------------------

REWARDS = """
    from rollflow.api import RewardResult

    THRESHOLD = 0.5

    def score(problem, response):
        return len(response) / problem.meta["id"]

    def verdict(problem, response):
        return RewardResult(0.25, {"style": 1.0})

    def boom(problem, response):
        return 1 / 0

    def text(problem, response):
        return "1.0"

    def nan(problem, response):
        return float("nan")
"""


def test_default_reward_is_exact_match(tmp_path):
    task = FileTask(write_jsonl(tmp_path / "d.jsonl", ROWS))
    p = task.eval_problems()[0]
    assert task.verify(p, f"  {p.answer}\n") == RewardResult(1.0, {"exact": 1.0})
    assert task.verify(p, p.answer + "x") == RewardResult(0.0, {"exact": 0.0})


def test_reward_fn_from_file_spec_sees_meta(tmp_path):
    module = write_module(tmp_path / "my_rewards.py", REWARDS)
    task = FileTask(write_jsonl(tmp_path / "d.jsonl", ROWS), reward_fn=f"{module}:score")
    p = Problem("q", "a", {"id": 4})
    assert task.verify(p, "abc") == RewardResult(0.75, {"reward": 0.75})


def test_reward_fn_may_return_a_reward_result(tmp_path):
    fn = load_reward_fn(f"{write_module(tmp_path / 'my_rewards.py', REWARDS)}:verdict")
    assert call_reward_fn(fn, "verdict", Problem("q", "a"), "r", 0) == RewardResult(0.25, {"style": 1.0})


@pytest.mark.parametrize("value", [True, 3, 0.5])
def test_reward_fn_numbers_become_results(value):
    result = call_reward_fn(lambda p, r: value, "const", Problem("q", "a"), "r", 0)
    assert result == RewardResult(float(value), {"reward": float(value)})
    assert type(result.reward) is float


def test_raising_reward_fn_names_fn_sample_and_cause(tmp_path):
    spec = f"{write_module(tmp_path / 'my_rewards.py', REWARDS)}:boom"
    task = FileTask(write_jsonl(tmp_path / "d.jsonl", ROWS), reward_fn=spec)
    p = task.eval_problems()[0]
    expected = r"reward fn '.*my_rewards\.py:boom' raised ZeroDivisionError on sample 0: division by zero"
    with pytest.raises(RewardFnError, match=expected) as info:
        task.verify(p, "x")
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    with pytest.raises(RewardFnError, match=r"on sample 1: "):
        task.verify(p, "x")


def test_reward_fn_returning_wrong_type(tmp_path):
    fn = load_reward_fn(f"{write_module(tmp_path / 'my_rewards.py', REWARDS)}:text")
    expected = r"reward fn 'my:text' returned str on sample 17; expected a float, int, bool or RewardResult"
    with pytest.raises(RewardFnError, match=expected):
        call_reward_fn(fn, "my:text", Problem("q", "a"), "r", 17)


def test_reward_fn_returning_nan(tmp_path):
    fn = load_reward_fn(f"{write_module(tmp_path / 'my_rewards.py', REWARDS)}:nan")
    expected = r"reward fn 'my:nan' returned a reward of nan on sample 2; rewards must be finite"
    with pytest.raises(RewardFnError, match=expected):
        call_reward_fn(fn, "my:nan", Problem("q", "a"), "r", 2)


def test_load_builtin_by_module_spec():
    assert load_reward_fn("rollflow.tasks.reward_fn:exact_match") is exact_match


def test_malformed_spec():
    expected = r"reward fn spec 'my_rewards' is malformed; expected 'package\.module:function'"
    with pytest.raises(RewardFnError, match=expected):
        load_reward_fn("my_rewards")


def test_unimportable_module_includes_cause():
    expected = (
        r"'no_such_pkg_xyz\.mod:score': cannot import module 'no_such_pkg_xyz\.mod' "
        r"\(ModuleNotFoundError: No module named 'no_such_pkg_xyz'\); .*PYTHONPATH"
    )
    with pytest.raises(RewardFnError, match=expected):
        load_reward_fn("no_such_pkg_xyz.mod:score")


def test_missing_module_file(tmp_path):
    with pytest.raises(RewardFnError, match=r"file '.*absent\.py' does not exist"):
        load_reward_fn(f"{tmp_path / 'absent.py'}:score")


def test_module_file_that_fails_to_execute(tmp_path):
    module = write_module(tmp_path / "broken.py", "import no_such_pkg_xyz\n")
    expected = r"executing '.*broken\.py' raised ModuleNotFoundError: No module named 'no_such_pkg_xyz'"
    with pytest.raises(RewardFnError, match=expected):
        load_reward_fn(f"{module}:score")


def test_missing_attribute_suggests_close_callables(tmp_path):
    module = write_module(tmp_path / "my_rewards.py", REWARDS)
    with pytest.raises(RewardFnError, match=r"has no attribute 'scroe'; did you mean 'score'\?"):
        load_reward_fn(f"{module}:scroe")


def test_missing_attribute_without_close_match_lists_callables(tmp_path):
    module = write_module(tmp_path / "my_rewards.py", REWARDS)
    with pytest.raises(RewardFnError, match=r"has no attribute 'zzz'; its callables are \[.*'boom', .*'score'"):
        load_reward_fn(f"{module}:zzz")


def test_attribute_not_callable(tmp_path):
    module = write_module(tmp_path / "my_rewards.py", REWARDS)
    with pytest.raises(RewardFnError, match=r"'THRESHOLD' is a float, not callable"):
        load_reward_fn(f"{module}:THRESHOLD")


def test_bad_reward_spec_fails_at_construction(tmp_path):
    with pytest.raises(RewardFnError, match=r"malformed"):
        FileTask(write_jsonl(tmp_path / "d.jsonl", ROWS), reward_fn="oops")


def test_reading_a_file_draws_no_progress_bar_and_leaves_the_setting_alone(tmp_path, capfd):
    assert datasets.is_progress_bar_enabled()
    FileTask(write_jsonl(tmp_path / "rows.jsonl", ROWS))
    assert "Generating train split" not in capfd.readouterr().err
    assert datasets.is_progress_bar_enabled()  # the user's own `datasets` calls still get their bars
