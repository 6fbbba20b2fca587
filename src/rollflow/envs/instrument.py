"""Instrumenters: insert the statements that print stage markers (``tasks/partial_credit.py``) into a program before
it runs, so that a crash still says how far the program got.

``RuleInstrumenter`` is the default: regular expressions per stage, searched in the source text of the program's
statements. ``ModelInstrumenter`` asks a frozen language model to insert the markers and accepts its program only if
the sole change is added marker statements (compared on the AST); otherwise it uses a fallback instrumenter.

Insertion is by line, not by ``ast.unparse``: unparsing would drop the program's comments and reformat it, so the
program that runs (and its tracebacks' line texts) would no longer be the one the policy wrote. The cost is that the
insertion must respect the layout itself: a statement alone on its lines gets each marker on a new line below it, at
its indentation; a statement that shares a line (``a = f(); b = 2``, ``if x: a = f()``) gets ``; <marker>`` right
after it on that line. Either way the marker runs exactly when the statement completed. Line numbers of the
statements below an inserted marker shift by one.

Not covered: a program that rebinds ``print`` or replaces ``sys.stdout`` hides its markers; a marker inserted into a
function that is never called never prints (rules match source order, not execution order).
"""

from __future__ import annotations

import ast
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Protocol

from rollflow.api import InferenceEngine, SamplingParams
from rollflow.tasks.partial_credit import MARKER, MARKER_LINE, check_stage, marker


class Instrumenter(Protocol):
    def instrument(self, source: str, stages: Sequence[str]) -> str:
        """``source`` with the markers of ``stages`` inserted; a source that does not parse comes back unchanged."""
        ...


ML_STAGES = ("loaded_data", "built_model", "trained", "wrote_answer")
"""The stages of a typical ML-engineering program, in the order it reaches them; ``ML_RULES`` covers them."""

ML_RULES: Mapping[str, tuple[str, ...]] = MappingProxyType({  # read-only: per-task rules go through .extended
    "loaded_data": (
        r"\bread_(?:csv|json|parquet|table|excel|pickle|feather)\s*\(",  # pandas
        r"\b(?:np|numpy|torch|json|pickle|joblib)\.load\s*\(",
        r"\b(?:load|fetch)_(?!model|weights|state)\w*\s*\(",  # load_dataset(, load_iris(, load_data(
        r"\bopen\s*\(", r"\.read(?:lines)?\s*\(", r"\bloadtxt\s*\(", r"\bDataLoader\s*\(",
    ),
    "built_model": (
        r"\b\w*(?:Classifier|Regressor|Regression|Model|Net|Network|Pipeline|Booster|SVC|SVR)\s*\(",
        r"\bmake_pipeline\s*\(", r"\.from_pretrained\s*\(", r"\bnn\.Sequential\s*\(",
    ),
    "trained": (
        r"\.fit\s*\(",
        r"\btrain(?!_test_split)(?:_\w+)?\s*\((?!\s*\))",  # train(model, data), train_model(...); not model.train()
        r"\btrainer\.train\s*\(", r"\boptimi[sz]er\.step\s*\(",
    ),
    "wrote_answer": (
        r"\.to_(?:csv|json|parquet)\s*\(", r"\.write(?:lines)?\s*\(", r"\bjson\.dump\s*\(",
        r"\b(?:np|numpy)\.save(?:txt)?\s*\(",
        r"\bprint\s*\(.*\b(?:pred|answer|submission|result)",  # print(predictions), print("answer:", ...)
    ),
})
"""Default rules for ``ML_STAGES``: each a regular expression searched (``re.search``) in a statement's source text."""

# Statements after which a marker would never run.
_LEAVE_BLOCK = (ast.Return, ast.Raise, ast.Break, ast.Continue)


class RuleInstrumenter:
    """Inserts each stage's marker right after the first statement, in source order, whose source text matches one of
    the stage's rules. A stage whose rules match nothing gets no marker; two stages may mark the same statement.

    Candidates are the simple statements at every depth (module level, ``if __name__ == "__main__":``, function and
    method bodies, loop and ``with`` bodies): a marker after a statement in a function prints when that statement
    completes, wherever the function is called from. Compound statements are not matched themselves (a ``def``'s text
    is its whole body), nor are ``return``/``raise``/``break``/``continue`` (nothing after them runs), docstrings
    and markers already in the program.

    Per-task rules: ``RuleInstrumenter({"parsed": [r"\\bparse\\("]})`` for a task's own stages, or
    ``RuleInstrumenter().extended({"trained": [r"\\bmy_fit\\("]})`` to add patterns to the defaults."""

    def __init__(self, rules: Mapping[str, Sequence[str]] = ML_RULES) -> None:
        self.rules = {check_stage(stage): tuple(patterns) for stage, patterns in rules.items()}
        self._compiled = {stage: [_compile(stage, p) for p in patterns] for stage, patterns in self.rules.items()}

    def extended(self, rules: Mapping[str, Sequence[str]]) -> RuleInstrumenter:
        """A new instrumenter with ``rules``' patterns added to this one's (stage by stage; new stages added)."""
        return RuleInstrumenter({s: (*self.rules.get(s, ()), *rules.get(s, ())) for s in {**self.rules, **rules}})

    def instrument(self, source: str, stages: Sequence[str]) -> str:
        if missing := [s for s in stages if s not in self.rules]:
            raise ValueError(f"RuleInstrumenter has no rules for stages {missing}; it has rules for "
                             f"{sorted(self.rules)} (add some with .extended({{stage: [regex, ...]}}))")
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):  # ValueError: a null byte in the source
            return source  # the sandbox reports the error when it runs it
        candidates = sorted(_simple_statements(tree), key=lambda s: (s.lineno, s.col_offset))
        marks: dict[ast.stmt, list[str]] = {}
        for stage in dict.fromkeys(stages):
            for stmt in candidates:
                if any(p.search(ast.get_source_segment(source, stmt) or "") for p in self._compiled[stage]):
                    marks.setdefault(stmt, []).append(stage)
                    break
        return _insert(source, marks)


def _compile(stage: str, pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"rule {pattern!r} of stage {stage!r} is not a regular expression: {e}") from e


def _simple_statements(tree: ast.AST) -> Iterator[ast.stmt]:
    """The statements rules are matched against: not compound, not leaving their block, not a docstring (its prose
    names what the program will do, not what it did), not a marker already there."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.stmt) or hasattr(node, "body") or isinstance(node, (ast.Match, *_LEAVE_BLOCK)):
            continue
        docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        if not docstring and marker_stage(node) is None:
            yield node


def _lines(source: str) -> list[str]:
    """``source`` cut after each line break Python's tokenizer knows (``\\n``, ``\\r\\n``, ``\\r``), breaks kept;
    ``str.splitlines`` would also cut at form feeds and other characters that are not line breaks to Python."""
    return [line for line in re.split(r"(?<=\n)|(?<=\r)(?!\n)", source) if line]


def _column(line: str, byte_offset: int) -> int:
    """The character index of an AST column offset (AST columns count UTF-8 bytes)."""
    return len(line.encode()[:byte_offset].decode())


def _insert(source: str, marks: dict[ast.stmt, list[str]]) -> str:
    lines = _lines(source)
    # Last statement first, so that an edit never moves the positions of one still to be made.
    for stmt, stages in sorted(marks.items(), key=lambda kv: (kv[0].end_lineno, kv[0].end_col_offset), reverse=True):
        first, last = lines[stmt.lineno - 1], lines[stmt.end_lineno - 1]
        start, end = _column(first, stmt.col_offset), _column(last, stmt.end_col_offset)
        statements = [marker(s) for s in stages]
        before, after = first[:start], last[end:]
        if before.strip() == "" and (after.strip() == "" or after.lstrip().startswith("#")):
            newline = re.search(r"\r\n|\r|\n", last)
            eol = newline.group() if newline else "\n"
            if not newline:  # the last line of a file without a final newline
                lines[stmt.end_lineno - 1] = last + eol
            lines[stmt.end_lineno : stmt.end_lineno] = [before + s + eol for s in statements]
        else:
            lines[stmt.end_lineno - 1] = last[:end] + "".join("; " + s for s in statements) + after
    return "".join(lines)


def marker_stage(stmt: ast.stmt) -> str | None:
    """The stage whose marker statement ``stmt`` is (exactly ``marker(name)``, up to quoting), else None."""
    if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call) and stmt.value.args
            and isinstance(text := stmt.value.args[0], ast.Constant) and isinstance(text.value, str)):
        return None
    m = MARKER_LINE.match(text.value)
    if m is None or text.value != f"{MARKER} {m.group(1)}":
        return None
    return m.group(1) if ast.dump(stmt) == ast.dump(ast.parse(marker(m.group(1))).body[0]) else None


def _without_markers(tree: ast.Module) -> ast.Module:
    """``tree`` with every marker statement removed from every block (in place)."""
    for node in ast.walk(tree):
        for name, value in ast.iter_fields(node):
            if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                setattr(node, name, [s for s in value if marker_stage(s) is None])
    return tree


def only_adds_markers(original: str, instrumented: str) -> bool:
    """Whether ``instrumented`` parses and is ``original`` plus marker statements (markers already in ``original``
    may stay or go): their ASTs without markers are equal. Comments and layout are not compared."""
    try:
        a, b = ast.parse(original), ast.parse(instrumented)
    except (SyntaxError, ValueError):
        return False
    return ast.dump(_without_markers(a)) == ast.dump(_without_markers(b))


def markers_in(source: str) -> list[str]:
    """The stages whose marker statements ``source`` holds, in source order (repeats kept)."""
    tree = ast.parse(source)
    found = [s for s in ast.walk(tree) if isinstance(s, ast.stmt) and marker_stage(s) is not None]
    return [marker_stage(s) for s in sorted(found, key=lambda s: (s.lineno, s.col_offset))]


def instrument_prompt(source: str, stages: Sequence[str]) -> str:
    """What ``ModelInstrumenter`` asks: the marker statements to insert and the program, ending where the instrumented
    program begins (so a base model continues with it, and stops at the closing fence)."""
    listing = "\n".join(f"- {s}: {marker(s)}" for s in stages)
    return (
        "Insert a marker statement into the Python program below right after the statement that completes each "
        "stage, at that statement's indentation. Change nothing else. Stages and their marker statements:\n"
        f"{listing}\n\nProgram:\n```python\n{source.rstrip()}\n```\n\nThe same program with the markers:\n```python\n"
    )


def extract_program(completion: str) -> str:
    """The program in a completion of ``instrument_prompt``: the text up to the closing fence (a completion that opens
    a fence of its own first is read from inside it)."""
    if completion.lstrip().startswith("```"):
        completion = completion.lstrip().partition("\n")[2]
    return completion.partition("```")[0]


class ModelInstrumenter:
    """Asks a frozen language model (``generate``: prompt text → completion text) to insert the markers; accepts its
    program only if it parses, adds only marker statements (``only_adds_markers``) and marks at least one of the
    stages. Anything else, a ``generate`` that raises included, falls back to ``fallback``. ``accepted`` and
    ``rejected`` (a count per reason: ``raised``, ``unparseable``, ``changed``, ``no_markers``) say how often; a
    source that does not parse itself is returned unchanged without asking the model, and counted in neither.
    The check guarantees the program that runs is the policy's, not that the model put the markers in good places."""

    def __init__(self, generate: Callable[[str], str], fallback: Instrumenter) -> None:
        self.generate = generate
        self.fallback = fallback
        self.accepted = 0
        self.rejected: Counter[str] = Counter()
        self.last_error: str | None = None  # the last exception of ``generate``, as "Type: message"
        self._lock = threading.Lock()  # reward workers may instrument concurrently

    def instrument(self, source: str, stages: Sequence[str]) -> str:
        return self.attempt(source, stages)[0]

    def attempt(self, source: str, stages: Sequence[str]) -> tuple[str, str]:
        """``instrument`` that also says what happened to this one call: ``accepted``, a rejection reason (the
        fallback's program came back) or ``not_python`` (the source came back unchanged)."""
        try:
            ast.parse(source)
        except (SyntaxError, ValueError):
            return source, "not_python"
        try:
            program = extract_program(self.generate(instrument_prompt(source, stages)))
        except Exception as e:  # a model that fails costs marker quality, never the run
            with self._lock:
                self.last_error = f"{type(e).__name__}: {e}"
            return self._reject("raised", source, stages)
        try:
            ast.parse(program)
        except (SyntaxError, ValueError):
            return self._reject("unparseable", source, stages)
        if not only_adds_markers(source, program):
            return self._reject("changed", source, stages)
        if not set(markers_in(program)) & set(stages):
            return self._reject("no_markers", source, stages)
        with self._lock:
            self.accepted += 1
        return program, "accepted"

    def _reject(self, reason: str, source: str, stages: Sequence[str]) -> tuple[str, str]:
        with self._lock:
            self.rejected[reason] += 1
        return self.fallback.instrument(source, stages), reason

    @classmethod
    def from_checkpoint(cls, path: str | Path, fallback: Instrumenter, max_new_tokens: int = 256,
                        field: str = "task.instrumenter") -> ModelInstrumenter:
        """A frozen causal LM from a local Hugging Face checkpoint directory (never a hub), decoding greedily; a
        directory that holds no model is a ``FileNotFoundError`` naming ``field``."""
        from rollflow.engines.hf_inference import HFInferenceEngine
        from rollflow.engines.models import load_pretrained

        model, tokenizer = load_pretrained(path, field=field)
        bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        generate = engine_generate(HFInferenceEngine(model, tokenizer), lambda text: [*bos, *tokenizer.encode(text)],
                                   lambda ids: tokenizer.decode(ids, skip_special_tokens=True), max_new_tokens)
        lock = threading.Lock()  # reward workers score concurrently; one engine decodes one request at a time

        def one_at_a_time(prompt: str) -> str:
            with lock:
                return generate(prompt)

        return cls(one_at_a_time, fallback)


def engine_generate(engine: InferenceEngine, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str],
                    max_new_tokens: int = 4096) -> Callable[[str], str]:
    """A ``generate`` for ``ModelInstrumenter`` from an inference engine: greedy decoding, so one program always gets
    the same instrumentation. ``encode`` turns the prompt into the ids the model expects (BOS included, if it wants
    one); ``decode`` turns response ids back into text. ``max_new_tokens`` is a bound, not a target: a program longer
    than it comes back cut, does not parse, and falls back."""
    params = SamplingParams(max_new_tokens=max_new_tokens, greedy=True)

    def generate(prompt: str) -> str:
        (generation,) = engine.generate([encode(prompt)], params)
        return decode(generation.response_ids)

    return generate
