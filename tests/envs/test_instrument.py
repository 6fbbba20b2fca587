"""Instrumenters insert stage markers and nothing else: the rule instrumenter after the right statements (exact text),
the instrumented program prints what the original printed plus its markers, and the model instrumenter accepts a
model's program only when it differs from the original by marker statements alone."""

import contextlib
import io
import string

import pytest

from rollflow.engines.hf_inference import HFInferenceEngine
from rollflow.engines.models import TinyModelSpec, char_tokenizer, load_pretrained, save_pretrained, tiny_model
from rollflow.envs.instrument import (
    ML_STAGES,
    ModelInstrumenter,
    RuleInstrumenter,
    engine_generate,
    extract_program,
    instrument_prompt,
    markers_in,
    only_adds_markers,
)
from rollflow.tasks.partial_credit import stages_reached, strip_markers

PROGRAM = '''\
"""A mean predictor, in the shape of an ML-engineering answer."""


class MeanModel:
    def fit(self, xs):
        self.mean = sum(xs) / len(xs)  # empty data fails here
        return self

    def predict(self, n):
        return [self.mean] * n


def load_data():
    return {"train": TRAIN, "test": [None] * 2}


def main():
    data = load_data()
    print("rows:", len(data["train"]))
    model = MeanModel()
    model.fit(data["train"])
    predictions = model.predict(len(data["test"]))
    print("predictions:", predictions)


if __name__ == "__main__":
    main()
'''

INSTRUMENTED = '''\
"""A mean predictor, in the shape of an ML-engineering answer."""


class MeanModel:
    def fit(self, xs):
        self.mean = sum(xs) / len(xs)  # empty data fails here
        return self

    def predict(self, n):
        return [self.mean] * n


def load_data():
    return {"train": TRAIN, "test": [None] * 2}


def main():
    data = load_data()
    print('@@stage loaded_data', flush=True)
    print("rows:", len(data["train"]))
    model = MeanModel()
    print('@@stage built_model', flush=True)
    model.fit(data["train"])
    print('@@stage trained', flush=True)
    predictions = model.predict(len(data["test"]))
    print("predictions:", predictions)
    print('@@stage wrote_answer', flush=True)


if __name__ == "__main__":
    main()
'''


def run(source, train):
    """Exec ``source`` as a main program with the global ``TRAIN``: (its stdout, the exception it raised or None)."""
    buffer, error = io.StringIO(), None
    with contextlib.redirect_stdout(buffer):
        try:
            exec(compile(source, "<program>", "exec"), {"__name__": "__main__", "TRAIN": train})
        except Exception as e:
            error = e
    return buffer.getvalue(), error


def rules(source, stages):
    """The default rule instrumenter's program, checked to differ from ``source`` by marker statements alone."""
    instrumented = RuleInstrumenter().instrument(source, stages)
    assert only_adds_markers(source, instrumented)
    return instrumented


def test_rules_mark_the_first_matching_statement_of_each_stage():
    assert rules(PROGRAM, ML_STAGES) == INSTRUMENTED


def test_instrumented_program_prints_the_same_plus_its_markers():
    original, error = run(PROGRAM, [1.0, 3.0])
    assert error is None and original == "rows: 2\npredictions: [2.0, 2.0]\n"
    stdout, error = run(INSTRUMENTED, [1.0, 3.0])
    assert error is None
    assert strip_markers(stdout) == original
    assert stages_reached(stdout, ML_STAGES) == list(ML_STAGES)


def test_a_program_that_raises_midway_reaches_only_the_earlier_stages():
    original, error = run(PROGRAM, [])
    assert isinstance(error, ZeroDivisionError) and original == "rows: 0\n"
    stdout, error = run(INSTRUMENTED, [])
    assert isinstance(error, ZeroDivisionError)
    assert strip_markers(stdout) == original
    assert stages_reached(stdout, ML_STAGES) == ["loaded_data", "built_model"]


def test_a_statement_sharing_its_line_gets_its_marker_on_that_line():
    source = ('import pandas as pd\n'
              'if True: df = pd.read_csv(PATH)\n'
              's = "é"; m = BigModel(); x = 1\n'
              'm.fit(\n'
              '    df)  # trained\n'
              'return_value = 0')  # no final newline
    assert rules(source, ML_STAGES) == (
        'import pandas as pd\n'
        "if True: df = pd.read_csv(PATH); print('@@stage loaded_data', flush=True)\n"
        "s = \"é\"; m = BigModel(); print('@@stage built_model', flush=True); x = 1\n"
        'm.fit(\n'
        '    df)  # trained\n'
        "print('@@stage trained', flush=True)\n"
        'return_value = 0')


def test_line_endings_and_tabs_are_kept_and_unreachable_places_are_not_marked():
    source = "def load():\r\n\treturn read_csv(p)\r\n\r\ndef go():\r\n\tx = load_data()\r\n"
    assert rules(source, ["loaded_data"]) == (
        "def load():\r\n\treturn read_csv(p)\r\n\r\ndef go():\r\n\tx = load_data()\r\n"
        "\tprint('@@stage loaded_data', flush=True)\r\n")


def test_docstrings_and_existing_markers_are_not_matched():
    source = ('"""Loads with read_csv(path), then prints the predictions."""\n'
              "print('@@stage wrote_answer', flush=True)\n"
              "data = read_csv(p)\n")
    assert rules(source, ML_STAGES) == source + "print('@@stage loaded_data', flush=True)\n"


def test_two_stages_on_one_statement_and_a_stage_that_matches_nothing():
    source = "model = Pipeline(steps).fit(X, y)\nprint(score)\n"
    assert rules(source, ML_STAGES) == (
        "model = Pipeline(steps).fit(X, y)\n"
        "print('@@stage built_model', flush=True)\n"
        "print('@@stage trained', flush=True)\n"
        "print(score)\n")


def test_per_task_rules():
    source = "rows = parse(text)\nanswer = solve(rows)\nemit(answer)\n"
    own = RuleInstrumenter({"parsed": [r"\bparse\("], "solved": [r"\bsolve\("]})
    assert markers_in(own.instrument(source, ["parsed", "solved"])) == ["parsed", "solved"]
    no_final_newline = own.instrument("rows = parse(text)", ["parsed"])
    assert no_final_newline == "rows = parse(text)\nprint('@@stage parsed', flush=True)\n"
    extended = RuleInstrumenter().extended({"wrote_answer": [r"\bemit\("], "solved": [r"\bsolve\("]})
    assert markers_in(extended.instrument(source, ["solved", "wrote_answer"])) == ["solved", "wrote_answer"]
    with pytest.raises(ValueError, match=r"no rules for stages \['parsed'\]"):
        RuleInstrumenter().instrument(source, ["parsed"])
    with pytest.raises(ValueError, match="rule '\\(' of stage 'x' is not a regular expression"):
        RuleInstrumenter({"x": ["("]})


def test_a_program_that_does_not_parse_comes_back_unchanged():
    source = "data = read_csv(p)\nmodel = Model(\n"
    assert RuleInstrumenter().instrument(source, ML_STAGES) == source
    assert RuleInstrumenter().instrument("x = 1\0\n", ML_STAGES) == "x = 1\0\n"


class CountingFallback:
    def __init__(self):
        self.rules, self.calls = RuleInstrumenter(), 0

    def instrument(self, source, stages):
        self.calls += 1
        return self.rules.instrument(source, stages)


def test_model_output_that_only_adds_markers_is_accepted():
    # Other quotes and a marker of its own choosing, still only markers: accepted as the model wrote it.
    answer = INSTRUMENTED.replace("'@@stage trained'", '"@@stage trained"')
    prompts, fallback = [], CountingFallback()
    instrumenter = ModelInstrumenter(lambda p: prompts.append(p) or answer + "```\nTrailing talk.", fallback)
    assert instrumenter.instrument(PROGRAM, ML_STAGES) == answer
    assert (instrumenter.accepted, instrumenter.rejected, fallback.calls) == (1, {}, 0)
    assert prompts == [instrument_prompt(PROGRAM, ML_STAGES)] and PROGRAM.rstrip() in prompts[0]


@pytest.mark.parametrize("completion, reason", [
    (INSTRUMENTED.replace("len(xs)", "max(len(xs), 1)"), "changed"),  # markers plus a quiet fix: not only markers
    (INSTRUMENTED.replace("print('@@stage trained', flush=True)", "print('@@stage trained')"), "changed"),  # unflushed
    (INSTRUMENTED.replace('    print("rows:", len(data["train"]))\n', ""), "changed"),  # a line dropped
    ("def main(:\n", "unparseable"),
    (PROGRAM, "no_markers"),
])
def test_model_output_that_changes_the_program_is_rejected_for_the_fallback(completion, reason):
    fallback = CountingFallback()
    instrumenter = ModelInstrumenter(lambda p: completion, fallback)
    assert instrumenter.instrument(PROGRAM, ML_STAGES) == INSTRUMENTED
    assert (instrumenter.accepted, instrumenter.rejected, fallback.calls) == (0, {reason: 1}, 1)
    assert instrumenter.attempt(PROGRAM, ML_STAGES) == (INSTRUMENTED, reason)  # the outcome of this one call


def test_a_model_that_raises_falls_back_and_an_unparseable_source_is_not_sent():
    def broken(prompt):
        raise RuntimeError("engine gone")

    instrumenter = ModelInstrumenter(broken, RuleInstrumenter())
    assert instrumenter.instrument(PROGRAM, ML_STAGES) == INSTRUMENTED
    assert instrumenter.rejected == {"raised": 1} and instrumenter.last_error == "RuntimeError: engine gone"
    asked = ModelInstrumenter(lambda p: pytest.fail("asked about a program that does not parse"), RuleInstrumenter())
    assert asked.instrument("def f(:\n", ML_STAGES) == "def f(:\n"
    assert (asked.accepted, asked.rejected) == (0, {})
    assert asked.attempt("def f(:\n", ML_STAGES) == ("def f(:\n", "not_python")


def test_a_checkpoint_is_loaded_as_the_model_instrumenter_and_a_bad_one_names_the_field(tmp_path):
    tokenizer = char_tokenizer(string.printable)
    spec = TinyModelSpec(hidden_size=16, layers=1, heads=2, intermediate_size=32, max_positions=2048)
    save_pretrained(tiny_model(spec, tokenizer, seed=0), tokenizer, tmp_path / "ckpt")
    instrumenter = ModelInstrumenter.from_checkpoint(tmp_path / "ckpt", RuleInstrumenter(), max_new_tokens=8)
    program, outcome = instrumenter.attempt(PROGRAM, ML_STAGES)
    assert program == INSTRUMENTED and outcome in ("unparseable", "changed")  # 8 untrained characters: the rules
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"task.instrumenter='.*empty' is not a Hugging Face checkpoint "
                                                r"directory .* or task.instrumenter=rules for the rule-based"):
        ModelInstrumenter.from_checkpoint(tmp_path / "empty", RuleInstrumenter())


def test_extract_program_reads_up_to_the_closing_fence():
    assert extract_program("x = 1\n```\nmore") == "x = 1\n"
    assert extract_program("```python\nx = 1\n```") == "x = 1\n"
    assert extract_program("x = 1\n") == "x = 1\n"


def test_a_real_local_model_is_asked_and_its_untrained_output_falls_back(tmp_path):
    # The built-in tiny model, untrained, over the characters of Python source; saved and loaded back as a user's
    # local checkpoint would be.
    tokenizer = char_tokenizer(string.printable)
    spec = TinyModelSpec(hidden_size=16, layers=1, heads=2, intermediate_size=32, max_positions=2048)
    save_pretrained(tiny_model(spec, tokenizer, seed=0), tokenizer, tmp_path)
    model, tokenizer = load_pretrained(tmp_path)
    engine = HFInferenceEngine(model, tokenizer)
    generate = engine_generate(engine, lambda text: [tokenizer.bos_token_id, *tokenizer.encode(text)],
                               lambda ids: tokenizer.decode(ids, skip_special_tokens=True), max_new_tokens=24)
    prompt = instrument_prompt(PROGRAM, ML_STAGES)
    text = generate(prompt)
    assert text and text == generate(prompt)  # greedy: the same program always gets the same answer
    assert len(tokenizer.encode(text)) <= 24

    fallback = CountingFallback()
    instrumenter = ModelInstrumenter(generate, fallback)
    assert instrumenter.instrument(PROGRAM, ML_STAGES) == INSTRUMENTED
    assert instrumenter.accepted == 0 and fallback.calls == 1
    assert sum(instrumenter.rejected.values()) == 1 and set(instrumenter.rejected) <= {"unparseable", "changed"}
