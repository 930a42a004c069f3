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
    """One public set's rows: the fields a row must have (a tuple offers alternatives) and the
    harness task built over a file of them."""

    name: str
    fields: tuple[str | tuple[str, ...], ...]
    task: Callable[[str, Path, dict[str, Any]], dict[str, Any]]
    check: Callable[[dict[str, Any]], str | None] = lambda row: None  # what is wrong with a row's values


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


def _lettered(question: str, options: list[str]) -> str:
    """MMLU's prompt (Hendrycks et al. 2021; the harness's mmlu template): options A-D, then 'Answer:'."""
    return question.strip() + "\n" + "".join(f"{LETTERS[i]}. {o}\n" for i, o in enumerate(options)) + "Answer:"


def _sentiment(row: dict[str, Any]) -> str:
    label = str(row["label"]).strip().lower()
    return SENTIMENT_ALIASES.get(label, label)


def _finance(name: str, path: Path, _: dict[str, Any]) -> dict[str, Any]:
    def text(row: dict[str, Any]) -> str:  # FinGPT's sentiment instruction (Wang et al. 2023, FinGPT benchmark)
        body = row.get("text") or row.get("sentence")  # the loader gives a file's rows every key, None where absent
        return (
            "Instruction: What is the sentiment of this news? Please choose an answer from "
            f"{{negative/neutral/positive}}.\nInput: {body}\nAnswer:"
        )

    return _choice_task(name, path, text, list(SENTIMENTS), lambda row: SENTIMENTS.index(_sentiment(row)))


def _answer_index(row: dict[str, Any]) -> int:
    answer = row["answer"]
    return LETTERS.index(answer.strip().upper()) if isinstance(answer, str) else int(answer)


def _mmlu(name: str, path: Path, _: dict[str, Any]) -> dict[str, Any]:
    return _choice_task(
        name,
        path,
        lambda row: _lettered(row["question"], row["choices"]),
        lambda row: list(LETTERS[: len(row["choices"])]),
        _answer_index,
    )


def _check_mmlu(row: dict[str, Any]) -> str | None:
    choices, answer = row["choices"], row["answer"]
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
        return f"field 'choices' must be a list of 2 to {len(LETTERS)} options"
    valid = LETTERS[: len(choices)]
    if isinstance(answer, str) and answer.strip().upper() in valid:
        return None
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return None
    return f"field 'answer' is {answer!r}; expected an option index 0-{len(choices) - 1} or a letter of {valid}"


def _pubmedqa(name: str, path: Path, _: dict[str, Any]) -> dict[str, Any]:
    def text(row: dict[str, Any]) -> str:  # the harness's pubmedqa prompt: abstract, question, yes/no/maybe
        context = row.get("context") or ""
        if isinstance(context, dict):
            context = " ".join(context.get("contexts") or [])
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
    return _choice_task(
        name,
        path,
        lambda row: _lettered(row["question"], list(row["options"].values())),
        lambda row: list(row["options"]),
        lambda row: list(row["options"]).index(row["answer_idx"]),
    )


def _humaneval(name: str, path: Path, options: dict[str, Any]) -> dict[str, Any]:
    timeout_s = options["timeout_s"]

    def pass_at_1(row: dict[str, Any], results: list[str]) -> dict[str, float]:
        program = row["prompt"] + results[0] + "\n\n" + row["test"] + f"\n\ncheck({row['entry_point']})\n"
        return {"pass@1": float(passes(program, timeout_s))}

    return _local(name, path) | {
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{canonical_solution}}",
        "target_delimiter": "",
        "generation_kwargs": {"until": HUMANEVAL_STOPS, "do_sample": False, "max_gen_toks": options["max_gen_toks"]},
        "process_results": pass_at_1,
        "metric_list": [{"metric": "pass@1", "aggregation": "mean", "higher_is_better": True}],
        "repeats": 1,
    }


def _one_of(field: str, allowed: tuple[str, ...], value: Callable[[dict[str, Any]], Any]) -> Callable:
    def check(row: dict[str, Any]) -> str | None:
        got = value(row)
        return None if got in allowed else f"field {field!r} is {row[field]!r}; expected one of {', '.join(allowed)}"

    return check


def _check_medmcqa(row: dict[str, Any]) -> str | None:
    cop = row["cop"]
    return None if isinstance(cop, int) and 0 <= cop <= 3 else f"field 'cop' is {cop!r}; expected 0-3 (opa-opd)"


def _check_medqa(row: dict[str, Any]) -> str | None:
    if not isinstance(row["options"], dict) or row["answer_idx"] not in row["options"]:
        return f"field 'answer_idx' is {row['answer_idx']!r}; expected a key of 'options'"
    return None


FORMATS = {
    "finance": [
        RowFormat(
            "fpb_fiqa_tfns",
            (("text", "sentence"), "label"),
            _finance,
            _one_of("label", SENTIMENTS, _sentiment),
        )
    ],
    "mmlu": [RowFormat("mmlu", ("question", "choices", "answer"), _mmlu, _check_mmlu)],
    "medical": [  # told apart by their fields
        RowFormat(
            "pubmedqa",
            ("question", "final_decision"),
            _pubmedqa,
            _one_of("final_decision", ("yes", "no", "maybe"), lambda r: r["final_decision"]),
        ),
        RowFormat("medmcqa", ("question", "opa", "opb", "opc", "opd", "cop"), _medmcqa, _check_medmcqa),
        RowFormat("medqa", ("question", "options", "answer_idx"), _medqa, _check_medqa),
    ],
    "code": [RowFormat("humaneval", ("task_id", "prompt", "test", "entry_point"), _humaneval)],
}
METRICS = {"finance": "acc", "mmlu": "acc", "medical": "acc", "code": "pass@1"}


def _missing(row: dict[str, Any], fields: tuple[str | tuple[str, ...], ...]) -> list[str]:
    return [
        "/".join(f) if isinstance(f, tuple) else f
        for f in fields
        if not any(k in row for k in (f if isinstance(f, tuple) else (f,)))
    ]


def check_suite_file(suite: str, path: str | Path) -> RowFormat:
    """The row format of `suite`'s file, every line checked.

    Raises InputError naming the suite, the file, the line and the field at the first bad row:
    an unknown suite, a missing or empty file, a line that is not a JSON object, a missing field,
    a label outside the set's classes."""
    if suite not in FORMATS:
        raise InputError(f"evaluation suite {suite!r} is unknown; choose from {', '.join(FORMATS)}")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"evaluation suite {suite}: {path} does not exist")
    chosen: RowFormat | None = None
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"evaluation suite {suite}: {path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{where}: not JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: a row must be a JSON object")
        if chosen is None:
            fits = [f for f in FORMATS[suite] if not _missing(row, f.fields)]
            if not fits:
                wanted = " or ".join(f"{f.name} ({', '.join(_missing(row, f.fields))} missing)" for f in FORMATS[suite])
                raise InputError(f"{where}: the row fits no {suite} format: {wanted}")
            chosen = fits[0]
        if missing := _missing(row, chosen.fields):
            raise InputError(f"{where}: field {missing[0]!r} missing (the file's rows are {chosen.name} rows)")
        if problem := chosen.check(row):
            raise InputError(f"{where}: {problem}")
    if chosen is None:
        raise InputError(f"evaluation suite {suite}: {path} has no rows")
    return chosen


def run_suites(
    lm: Any, files: Mapping[str, str | Path], *, max_gen_toks: int = 256, timeout_s: float = 10.0
) -> dict[str, dict[str, Any]]:
    """Each suite's score on its file: {suite: {"format", "metric", "score", "stderr", "n", "items"}},
    and for the multiple-choice suites "loglikelihoods" (per item, per option, in nats).

    `lm` is a harness model (an `lm_eval.api.model.LM`, e.g. `HFLM` over a PEFT model). `score` is
    accuracy (multiple choice) or pass@1 (code) in [0, 1]; `stderr` its standard error over the
    items (sample standard deviation / sqrt(n)); `items` the per-item 0/1 outcomes in file order.
    Raises InputError for a bad file, before the model is run."""
    from lm_eval import simple_evaluate

    formats = {suite: check_suite_file(suite, path) for suite, path in files.items()}
    options = {"max_gen_toks": max_gen_toks, "timeout_s": timeout_s}
    tasks = [formats[s].task(f"fedtune_{s}", Path(files[s]), options) for s in files]
    out = simple_evaluate(lm, tasks=tasks, log_samples=True, bootstrap_iters=0, confirm_run_unsafe_code=True)
    scores: dict[str, dict[str, Any]] = {}
    for suite in files:
        metric = METRICS[suite]
        samples = sorted(out["samples"][f"fedtune_{suite}"], key=lambda s: s["doc_id"])
        items = [float(s[metric]) for s in samples]
        n = len(items)
        mean = sum(items) / n
        stderr = (sum((x - mean) ** 2 for x in items) / (n - 1)) ** 0.5 / n**0.5 if n > 1 else None
        scores[suite] = {
            "format": formats[suite].name,
            "metric": metric,
            "score": mean,
            "stderr": stderr,
            "n": n,
            "items": items,
        }
        if metric == "acc":  # each option's log-likelihood (nats), in the row's option order
            scores[suite]["loglikelihoods"] = [[float(ll) for ll, _ in s["filtered_resps"]] for s in samples]
    return scores


def evaluate_suites(
    cfg: Any, adapter: Any, files: Mapping[str, str | Path], **options: Any
) -> dict[str, dict[str, Any]]:
    """`run_suites` for the config's base model with `adapter` (a wire file or state) applied."""
    from lm_eval.models.huggingface import HFLM

    from fedtune.model.builder import build_peft_model, tokenizer_for

    for suite, path in files.items():  # a bad file fails before the model loads
        check_suite_file(suite, path)
    model = build_peft_model(cfg, adapter).eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer_for(cfg), batch_size=cfg.eval.batch_size)
    return run_suites(lm, files, **options)
