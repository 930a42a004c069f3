"""The evaluation suites the field reports, run by lm-evaluation-harness on files the user brings.

FinGPT / FlowerTune / FATE-LLM report finance sentiment (FPB, FiQA-SA, TFNS), general knowledge
(MMLU), medical QA (PubMedQA, MedMCQA, MedQA) and code (HumanEval). Nothing is downloaded: each
suite reads one local JSON-lines file in its set's public row format, checked line by line before
any model is loaded. lm-evaluation-harness (EleutherAI) is the engine: the multiple-choice suites
score each option by its log-likelihood after the prompt (its `multiple_choice` output type, metric
`acc`); code is generated greedily (`generate_until`) and scored pass@1 by running the set's own
test in a subprocess (`fedtune.training.sandbox`), since the harness's `code_eval` metric is fetched
from the Hugging Face hub and runs the code in the evaluating process.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.core.errors import InputError
from fedtune.training.sandbox import passes

LETTERS = "ABCDEFGHIJ"
SENTIMENTS = ("negative", "neutral", "positive")
# TFNS labels its classes by market direction; FinGPT's benchmarks read them as these sentiments
SENTIMENT_ALIASES = {"bearish": "negative", "bullish": "positive"}
HUMANEVAL_STOPS = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # Chen et al. 2021, section 2.2


@dataclass(frozen=True)
class RowFormat:
    """One public set's rows: the fields a row must have (a tuple offers alternatives), the fields
    the prompt reads as text, the harness task built over a file of them, and what is wrong with a
    row's values (None: nothing)."""

    name: str
    fields: tuple[str | tuple[str, ...], ...]
    task: Callable[[str, Path, dict[str, Any]], dict[str, Any]]
    check: Callable[[dict[str, Any]], str | None] = lambda row: None
    texts: tuple[str, ...] = ()


def _local(name: str, path: Path) -> dict[str, Any]:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
    }


def _choice_task(
    name: str, path: Path, text: Callable, choices: Callable | list[str], target: Callable
) -> dict[str, Any]:
    return _local(name, path) | {
        "output_type": "multiple_choice",
        "doc_to_text": text,
        "doc_to_choice": choices,
        "doc_to_target": target,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }


def _lettered(question: str, options: list[str], letters: list[str] | None = None) -> str:
    """MMLU's prompt (Hendrycks et al. 2021; the harness's mmlu template): the question, each option
    after its letter, then 'Answer:'."""
    letters = letters or list(LETTERS[: len(options)])
    return question.strip() + "\n" + "".join(f"{k}. {o}\n" for k, o in zip(letters, options, strict=True)) + "Answer:"


# the label encodings of the public releases (the Hugging Face datasets' ClassLabel order)
FPB_LABELS = ("negative", "neutral", "positive")  # financial_phrasebank
TFNS_LABELS = ("negative", "positive", "neutral")  # twitter-financial-news-sentiment: Bearish, Bullish, Neutral


def _named(row: dict[str, Any], encoding: tuple[str, ...]) -> str | None:
    """The row's label as a sentiment word: an index in the set's encoding, or a name."""
    label = row["label"]
    if isinstance(label, bool):
        return None
    if isinstance(label, int):
        return encoding[label] if 0 <= label < len(encoding) else None
    if isinstance(label, str):
        word = label.strip().lower()
        return SENTIMENT_ALIASES.get(word, word) if SENTIMENT_ALIASES.get(word, word) in SENTIMENTS else None
    return None


def _fiqa(row: dict[str, Any]) -> str | None:
    """FiQA-SA's score in [-1, 1] as a sentiment, at FinGPT's thresholds (benchmarks/fiqa.py)."""
    score = row["sentiment_score"]
    if isinstance(score, bool) or not isinstance(score, int | float) or not -1 <= score <= 1:
        return None
    return "negative" if score < -0.1 else "neutral" if score < 0.1 else "positive"


def _finance(sentiment: Callable[[dict[str, Any]], str | None], source: Callable[[dict[str, Any]], str]) -> Callable:
    """FinGPT's sentiment instruction (Wang et al. 2023, FinGPT benchmarks fpb.py, fiqa.py, tfns.py),
    which names the text `source(row)` calls it: news, or a tweet."""

    def task(name: str, path: Path, _: dict[str, Any]) -> dict[str, Any]:
        def text(row: dict[str, Any]) -> str:
            body = row.get("sentence") or row.get("text")  # the loader gives every row every key, None where absent
            return (
                f"Instruction: What is the sentiment of this {source(row)}? Please choose an answer from "
                f"{{negative/neutral/positive}}.\nInput: {body}\nAnswer:"
            )

        return _choice_task(name, path, text, list(SENTIMENTS), lambda row: SENTIMENTS.index(sentiment(row)))

    return task


def _sentiment_check(sentiment: Callable[[dict[str, Any]], str | None], field: str, expected: str) -> Callable:
    def check(row: dict[str, Any]) -> str | None:
        return None if sentiment(row) is not None else f"field {field!r} is {row.get(field)!r}; expected {expected}"

    return check


def _answer_index(row: dict[str, Any]) -> int:
    answer = row["answer"]
    if isinstance(answer, str):
        answer = answer.strip().upper()
        return int(answer) if answer.isdigit() else LETTERS.index(answer)
    return int(answer)


def _mmlu(name: str, path: Path, _: dict[str, Any]) -> dict[str, Any]:
    def text(row: dict[str, Any]) -> str:  # with a subject, the harness's mmlu header first
        subject = row.get("subject")
        header = ""
        if isinstance(subject, str) and subject:
            header = (
                f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
            )
        return header + _lettered(row["question"], row["choices"])

    return _choice_task(name, path, text, lambda row: list(LETTERS[: len(row["choices"])]), _answer_index)


def _check_mmlu(row: dict[str, Any]) -> str | None:
    choices, answer = row["choices"], row["answer"]
    if (
        not isinstance(choices, list)
        or not 2 <= len(choices) <= len(LETTERS)
        or not all(isinstance(c, str) for c in choices)
    ):
        return f"field 'choices' must be a list of 2 to {len(LETTERS)} strings"
    valid = LETTERS[: len(choices)]
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in valid:
        return None
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return None
    return f"field 'answer' is {answer!r}; expected an option index 0-{len(choices) - 1} or one letter of {valid}"


def _pubmedqa(name: str, path: Path, _: dict[str, Any]) -> dict[str, Any]:
    def text(row: dict[str, Any]) -> str:  # the harness's pubmedqa prompt: abstract, question, yes/no/maybe
        context = row.get("context") or ""
        if isinstance(context, dict):
            context = "\n".join(context.get("contexts") or [])
        return f"Abstract: {context}\nQuestion: {row['question']}\nAnswer:"

    return _choice_task(
        name, path, text, ["yes", "no", "maybe"], lambda row: ["yes", "no", "maybe"].index(row["final_decision"])
    )


def _medmcqa(name: str, path: Path, _: dict[str, Any]) -> dict[str, Any]:
    options = ("opa", "opb", "opc", "opd")
    return _choice_task(
        name,
        path,
        lambda row: _lettered(row["question"], [row[o] for o in options]),
        list("ABCD"),
        lambda row: int(row["cop"]),
    )


def _medqa(name: str, path: Path, _: dict[str, Any]) -> dict[str, Any]:
    """The options under their own keys (A-E in MedQA), in key order, in the prompt and as the choices scored."""
    present = lambda row: sorted(k for k, v in row["options"].items() if v is not None)  # noqa: E731 (loader unifies keys)
    return _choice_task(
        name,
        path,
        lambda row: _lettered(row["question"], [row["options"][k] for k in present(row)], present(row)),
        present,
        lambda row: present(row).index(row["answer_idx"]),
    )


def _humaneval(name: str, path: Path, options: dict[str, Any]) -> dict[str, Any]:
    timeout_s = options["timeout_s"]

    def pass_at_1(row: dict[str, Any], results: list[str]) -> dict[str, float]:
        program = row["prompt"] + results[0] + "\n\n" + row["test"] + f"\n\ncheck({row['entry_point']})\n"
        return {"pass@1": float(passes(program, timeout_s))}

    return _local(name, path) | {
        "output_type": "generate_until",
        "doc_to_text": lambda row: row["prompt"],
        "doc_to_target": lambda row: row.get("canonical_solution") or "",  # unused by pass@1
        "target_delimiter": "",
        "generation_kwargs": {"until": HUMANEVAL_STOPS, "do_sample": False, "max_gen_toks": options["max_gen_toks"]},
        "process_results": pass_at_1,
        "metric_list": [{"metric": "pass@1", "aggregation": "mean", "higher_is_better": True}],
        "repeats": 1,
    }


def _one_of(field: str, allowed: tuple[str, ...]) -> Callable:
    def check(row: dict[str, Any]) -> str | None:
        return (
            None
            if row[field] in allowed
            else f"field {field!r} is {row[field]!r}; expected one of {', '.join(allowed)}"
        )

    return check


def _check_medmcqa(row: dict[str, Any]) -> str | None:
    cop = row["cop"]
    if isinstance(cop, int) and not isinstance(cop, bool) and 0 <= cop <= 3:
        return None
    return f"field 'cop' is {cop!r}; expected 0-3 (opa-opd, the Hugging Face release's encoding)"


def _check_medqa(row: dict[str, Any]) -> str | None:
    options = row["options"]
    if not isinstance(options, dict) or len(options) < 2 or not all(isinstance(v, str) for v in options.values()):
        return "field 'options' must map option letters to their texts"
    if not isinstance(row["answer_idx"], str) or row["answer_idx"] not in options:
        return f"field 'answer_idx' is {row['answer_idx']!r}; expected a key of 'options'"
    return None


SENTIMENT_WORDS = "a sentiment (negative, neutral, positive)"
FORMATS = {
    "finance": [  # told apart by their fields: a label with a sentence (FPB) or a text (TFNS), or a score (FiQA-SA)
        RowFormat(
            "fpb",
            ("sentence", "label"),
            _finance(lambda r: _named(r, FPB_LABELS), lambda r: "news"),
            _sentiment_check(lambda r: _named(r, FPB_LABELS), "label", f"0-2 or {SENTIMENT_WORDS}"),
            ("sentence",),
        ),
        RowFormat(
            "tfns",
            ("text", "label"),
            _finance(lambda r: _named(r, TFNS_LABELS), lambda r: "tweet"),
            _sentiment_check(
                lambda r: _named(r, TFNS_LABELS), "label", f"0-2 (Bearish, Bullish, Neutral) or {SENTIMENT_WORDS}"
            ),
            ("text",),
        ),
        RowFormat(
            "fiqa_sa",
            ("sentence", "sentiment_score"),
            _finance(_fiqa, lambda r: "tweet" if r.get("format") == "post" else "news"),
            lambda r: None if _fiqa(r) else f"field 'sentiment_score' is {r['sentiment_score']!r}; expected [-1, 1]",
            ("sentence",),
        ),
    ],
    "mmlu": [RowFormat("mmlu", ("question", "choices", "answer"), _mmlu, _check_mmlu, ("question",))],
    "medical": [  # told apart by their fields
        RowFormat(
            "pubmedqa",
            ("question", "final_decision"),
            _pubmedqa,
            _one_of("final_decision", ("yes", "no", "maybe")),
            ("question",),
        ),
        RowFormat(
            "medmcqa",
            ("question", "opa", "opb", "opc", "opd", "cop"),
            _medmcqa,
            _check_medmcqa,
            ("question", "opa", "opb", "opc", "opd"),
        ),
        RowFormat("medqa", ("question", "options", "answer_idx"), _medqa, _check_medqa, ("question",)),
    ],
    "code": [
        RowFormat(
            "humaneval",
            ("task_id", "prompt", "test", "entry_point"),
            _humaneval,
            texts=("prompt", "test", "entry_point"),
        )
    ],
}
METRICS = {"finance": "acc", "mmlu": "acc", "medical": "acc", "code": "pass@1"}


def _missing(row: dict[str, Any], fields: tuple[str | tuple[str, ...], ...]) -> list[str]:
    """The fields (or groups of alternatives) of which the row has none."""
    groups = [f if isinstance(f, tuple) else (f,) for f in fields]
    return ["/".join(g) for g in groups if not any(row.get(k) is not None for k in g)]


def _rows(path: Path, where: str) -> list[tuple[int, str]]:
    """The file's non-blank lines, numbered as editors number them (JSON strings may hold U+2028)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{where}: {path} is not UTF-8 text (byte {error.start})") from None
    return [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip(" \t\r")]  # JSON's whitespace


def _kind(value: Any) -> str:
    """A JSON value's type in words (int and float are one: the loader widens them)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "text"
    return "a list" if isinstance(value, list) else "an object"


def check_suite_file(suite: str, path: str | Path) -> RowFormat:
    """The row format of `suite`'s file, every line checked.

    Raises InputError naming the suite, the file, the line and the field at the first bad row:
    an unknown suite, a missing or empty file, a line that is not a JSON object, a missing or null
    field, a text field that is not text, a label outside the set's classes, rows of two formats."""
    if suite not in FORMATS:
        raise InputError(f"evaluation suite {suite!r} is unknown; choose from {', '.join(FORMATS)}")
    path = Path(path)
    if not path.exists():
        raise InputError(f"evaluation suite {suite}: {path} does not exist")
    if not path.is_file():
        raise InputError(f"evaluation suite {suite}: {path} is not a file")
    chosen: RowFormat | None = None
    kinds: dict[str, tuple[str, int]] = {}  # each field's JSON type, and the line that set it
    for number, line in _rows(path, f"evaluation suite {suite}"):
        where = f"evaluation suite {suite}: {path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{where}: not JSON ({error.msg})") from None
        except RecursionError:
            raise InputError(f"{where}: not JSON (nested too deeply)") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: a row must be a JSON object")
        if chosen is None:
            fits = [f for f in FORMATS[suite] if not _missing(row, f.fields)]
            if not fits:
                wanted = " or ".join(f"{f.name} ({', '.join(_missing(row, f.fields))} missing)" for f in FORMATS[suite])
                raise InputError(f"{where}: the row fits no {suite} format: {wanted}")
            chosen = fits[0]
        if missing := _missing(row, chosen.fields):
            raise InputError(f"{where}: field {missing[0]!r} missing or null (the file's rows are {chosen.name} rows)")
        for field in chosen.texts:
            if not isinstance(row[field], str) or not row[field].strip():
                raise InputError(f"{where}: field {field!r} is {row[field]!r}; expected text")
        if problem := chosen.check(row):
            raise InputError(f"{where}: {problem}")
        for field, value in row.items():  # the harness's loader reads a file as columns of one type each
            if value is None:
                continue
            kind = _kind(value)
            first = kinds.setdefault(field, (kind, number))
            if kind != first[0]:
                raise InputError(f"{where}: field {field!r} is {kind} here but {first[0]} on line {first[1]}")
    if chosen is None:
        raise InputError(f"evaluation suite {suite}: {path} has no rows")
    return chosen


def _checked(files: Mapping[str, str | Path]) -> dict[str, RowFormat]:
    return {suite: check_suite_file(suite, path) for suite, path in files.items()}


def run_suites(
    lm: Any, files: Mapping[str, str | Path], *, max_gen_toks: int = 256, timeout_s: float = 10.0
) -> dict[str, dict[str, Any]]:
    """Each suite's score on its file: {suite: {"format", "metric", "score", "stderr", "n", "items"}},
    and for the multiple-choice suites "loglikelihoods" (per item, per option, in nats).

    `lm` is a harness model (an `lm_eval.api.model.LM`, e.g. `HFLM` over a PEFT model). `score` is
    accuracy (multiple choice) or pass@1 (code) in [0, 1]; `stderr` its standard error over the
    items (sample standard deviation / sqrt(n)); `items` the per-item 0/1 outcomes in file order.
    Raises InputError for a bad file, before the model is run."""
    return _score(lm, files, _checked(files), {"max_gen_toks": max_gen_toks, "timeout_s": timeout_s})


def _score(
    lm: Any, files: Mapping[str, str | Path], formats: dict[str, RowFormat], options: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = [formats[s].task(f"fedtune_{s}", Path(files[s]), options) for s in files]
    # our tasks come as objects: the harness's own index of its task YAMLs (about 19 s to build on
    # 2 cores, every call) is not needed
    out = simple_evaluate(
        lm,
        tasks=tasks,
        log_samples=True,
        bootstrap_iters=0,
        confirm_run_unsafe_code=True,
        task_manager=TaskManager(include_defaults=False),
    )
    scores: dict[str, dict[str, Any]] = {}
    for suite in files:
        metric = METRICS[suite]
        samples = sorted(out["samples"][f"fedtune_{suite}"], key=lambda s: s["doc_id"])
        items = [float(s[metric]) for s in samples]
        n = len(items)
        scores[suite] = {
            "format": formats[suite].name,
            "metric": metric,
            "score": statistics.fmean(items),
            "stderr": statistics.stdev(items) / math.sqrt(n) if n > 1 else None,
            "n": n,
            "items": items,
        }
        if metric == "acc":  # each option's log-likelihood (nats), in the row's option order
            scores[suite]["loglikelihoods"] = [[float(ll) for ll, _ in s["filtered_resps"]] for s in samples]
    return scores


def evaluate_suites(
    cfg: Any, adapter: Any, files: Mapping[str, str | Path], *, max_gen_toks: int = 256, timeout_s: float = 10.0
) -> dict[str, dict[str, Any]]:
    """`run_suites` for the config's base model with `adapter` (a wire file or state) applied; the
    files are checked before the model loads."""
    from lm_eval.models.huggingface import HFLM

    from fedtune.model.builder import build_peft_model, tokenizer_for

    formats = _checked(files)
    model = build_peft_model(cfg, adapter).eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer_for(cfg), batch_size=cfg.eval.batch_size)
    return _score(lm, files, formats, {"max_gen_toks": max_gen_toks, "timeout_s": timeout_s})
