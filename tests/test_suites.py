"""Standard evaluation suites on tiny files in each set's public row format.

The multiple-choice scores are checked against log-likelihoods computed here by hand (a forward
pass, the prompt written out as each set's paper or harness template has it); pass@1 against
completions whose outcome is known."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from fedtune.core.errors import InputError
from fedtune.training.sandbox import passes
from fedtune.training.suites import check_suite_file, evaluate_suites, run_suites

FPB = [  # financial_phrasebank rows: label 0 negative, 1 neutral, 2 positive
    {"sentence": "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn.", "label": 2},
    {"sentence": "The company expects net sales to stay at last year's level.", "label": 1},
]
TFNS = [  # twitter-financial-news-sentiment rows: label 0 Bearish, 1 Bullish, 2 Neutral
    {"text": "$AAPL downgraded to sell after weak guidance", "label": 0},
    {"text": "Stocks rally as inflation cools", "label": 1},
    {"text": "Company to hold annual meeting on May 5", "label": 2},
]
FIQA = [  # FiQA-SA rows: a sentiment score in [-1, 1]
    {"sentence": "Shares plunge after the profit warning", "sentiment_score": -0.6},
    {"sentence": "Board meets on Tuesday", "sentiment_score": 0.02},
    {"sentence": "Record quarter lifts the stock", "sentiment_score": 0.7},
]
MMLU = [  # cais/mmlu rows: answer an index (one letter also does, in a file of letters)
    {"question": "What is 2 + 3?", "choices": ["4", "5", "6", "7"], "answer": 1, "subject": "elementary_mathematics"},
    {
        "question": "Which gas do plants absorb?",
        "choices": ["oxygen", "nitrogen", "carbon dioxide", "helium"],
        "answer": 2,
    },
    {"question": "The capital of France is", "choices": ["Paris", "Rome", "Berlin", "Madrid"], "answer": 0},
]
PUBMEDQA = [  # pubmed_qa pqa_labeled rows
    {
        "question": "Does aspirin reduce fever?",
        "context": {"contexts": ["Aspirin is an antipyretic."]},
        "final_decision": "yes",
    },
    {
        "question": "Is vitamin C a cure for cancer?",
        "context": {"contexts": ["Trials found no effect."]},
        "final_decision": "no",
    },
]
MEDMCQA = [  # medmcqa rows: cop indexes opa-opd
    {"question": "Vitamin deficient in scurvy?", "opa": "A", "opb": "B12", "opc": "C", "opd": "D", "cop": 2},
    {"question": "Largest organ?", "opa": "Liver", "opb": "Skin", "opc": "Heart", "opd": "Lung", "cop": 1},
]
MEDQA = [  # MedQA-USMLE 4-option rows
    {
        "question": "First-line drug for anaphylaxis?",
        "options": {"A": "Epinephrine", "B": "Insulin", "C": "Heparin", "D": "Digoxin"},
        "answer_idx": "A",
    },
    {
        "question": "Which organ makes insulin?",
        "options": {"A": "Liver", "B": "Pancreas", "C": "Kidney", "D": "Spleen"},
        "answer_idx": "B",
    },
    {  # five options (MedQA's full release), listed out of order: shown and scored in key order
        "question": "Deficiency causing night blindness?",
        "options": {"B": "Vitamin C", "A": "Vitamin A", "C": "Vitamin D", "E": "Zinc", "D": "Iron"},
        "answer_idx": "A",
    },
]
HUMANEVAL = [  # openai_humaneval rows
    {
        "task_id": "HumanEval/0",
        "prompt": 'def add(a, b):\n    """Return a + b."""\n',
        "canonical_solution": "    return a + b\n",
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
        "entry_point": "add",
    },
    {
        "task_id": "HumanEval/1",
        "prompt": 'def double(x):\n    """Return 2 * x."""\n',
        "canonical_solution": "    return 2 * x\n",
        "test": "def check(candidate):\n    assert candidate(4) == 8\n",
        "entry_point": "double",
    },
    {
        "task_id": "HumanEval/2",
        "prompt": 'def first(xs):\n    """The first item."""\n',
        "canonical_solution": "    return xs[0]\n",
        "test": "def check(candidate):\n    assert candidate([7, 8]) == 7\n",
        "entry_point": "first",
    },
    {
        "task_id": "HumanEval/3",
        "prompt": 'def neg(x):\n    """Return -x."""\n',
        "canonical_solution": "    return -x\n",
        "test": "def check(candidate):\n    assert candidate(3) == -3\n",
        "entry_point": "neg",
    },
]


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _lettered(question: str, options: list[str], keys: str | list[str] = "ABCD") -> str:
    return question + "\n" + "".join(f"{k}. {o}\n" for k, o in zip(keys, options, strict=False)) + "Answer:"


def _by_hand(model: Any, tokenizer: Any, context: str, choices: list[str]) -> list[float]:
    """Each option's log-likelihood after `context` (the option after one space), in nats."""
    scores = []
    for choice in choices:
        whole = tokenizer.encode(context + " " + choice)
        start = len(tokenizer.encode(context))
        with torch.no_grad():
            logits = model(torch.tensor([whole])).logits[0].log_softmax(-1)
        scores.append(sum(float(logits[i - 1, whole[i]]) for i in range(start, len(whole))))
    return scores


def _check(scored: dict[str, Any], by_hand: list[list[float]], gold: list[int]) -> None:
    """The harness's log-likelihoods are the ones computed here, and its accuracy is theirs."""
    assert scored["loglikelihoods"] == [pytest.approx(row, abs=1e-4) for row in by_hand]
    items = [float(max(range(len(row)), key=row.__getitem__) == g) for row, g in zip(by_hand, gold, strict=True)]
    assert scored["items"] == items
    assert scored["score"] == pytest.approx(sum(items) / len(items)) and scored["n"] == len(items)


def test_multiple_choice_suites_score_what_each_options_log_likelihood_says(tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from fedtune.model.builder import build_peft_model, initial_adapter_state, tokenizer_for

    adapter, _ = initial_adapter_state(tiny_config)
    files = {
        "finance": _jsonl(tmp_path / "tfns.jsonl", TFNS),
        "mmlu": _jsonl(tmp_path / "mmlu.jsonl", MMLU),
        "medical": _jsonl(tmp_path / "medqa.jsonl", MEDQA),
    }
    scores = evaluate_suites(tiny_config, adapter, files)

    model, tokenizer = build_peft_model(tiny_config, adapter).eval(), tokenizer_for(tiny_config)
    sentiment = (
        "Instruction: What is the sentiment of this %s? Please choose an answer from "
        "{negative/neutral/positive}.\nInput: %s\nAnswer:"
    )
    words = ["negative", "neutral", "positive"]
    assert scores["finance"]["format"] == "tfns"  # FinGPT asks about a tweet there, about news in FPB and FiQA
    tweets = [_by_hand(model, tokenizer, sentiment % ("tweet", r["text"]), words) for r in TFNS]
    _check(scores["finance"], tweets, [0, 2, 1])
    for rows, name, gold in ((FPB, "fpb", [2, 1]), (FIQA, "fiqa_sa", [0, 1, 2])):  # FiQA: FinGPT's +-0.1 cut
        scored = evaluate_suites(tiny_config, adapter, {"finance": _jsonl(tmp_path / f"{name}.jsonl", rows)})
        assert scored["finance"]["format"] == name
        news = [_by_hand(model, tokenizer, sentiment % ("news", r["sentence"]), words) for r in rows]
        _check(scored["finance"], news, gold)
    header = "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
    mmlu = [(header if "subject" in r else "") + _lettered(r["question"], r["choices"]) for r in MMLU]
    _check(scores["mmlu"], [_by_hand(model, tokenizer, prompt, list("ABCD")) for prompt in mmlu], [1, 2, 0])
    _check(
        scores["medical"],
        [
            _by_hand(
                model,
                tokenizer,
                _lettered(r["question"], [r["options"][k] for k in sorted(r["options"])], sorted(r["options"])),
                sorted(r["options"]),
            )
            for r in MEDQA
        ],
        [0, 1, 0],
    )
    assert scores["medical"]["format"] == "medqa" and scores["mmlu"]["metric"] == "acc"

    pubmedqa = evaluate_suites(tiny_config, adapter, {"medical": _jsonl(tmp_path / "pubmedqa.jsonl", PUBMEDQA)})[
        "medical"
    ]
    abstract = "Abstract: %s\nQuestion: %s\nAnswer:"
    assert pubmedqa["format"] == "pubmedqa"
    _check(
        pubmedqa,
        [
            _by_hand(model, tokenizer, abstract % (r["context"]["contexts"][0], r["question"]), ["yes", "no", "maybe"])
            for r in PUBMEDQA
        ],
        [0, 1],
    )
    medmcqa = evaluate_suites(tiny_config, adapter, {"medical": _jsonl(tmp_path / "medmcqa.jsonl", MEDMCQA)})["medical"]
    assert medmcqa["format"] == "medmcqa"
    _check(
        medmcqa,
        [
            _by_hand(model, tokenizer, _lettered(r["question"], [r["opa"], r["opb"], r["opc"], r["opd"]]), list("ABCD"))
            for r in MEDMCQA
        ],
        [2, 1],
    )


class _Scripted:
    """A harness model that answers each HumanEval prompt with a fixed completion."""

    def __new__(cls, completions: dict[str, str]) -> Any:
        from lm_eval.api.model import LM

        class Scripted(LM):
            def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
                return [completions[request.args[0]] for request in requests]

            def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
                raise NotImplementedError

            def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
                raise NotImplementedError

        return Scripted()


def test_code_suite_is_pass_at_1_of_the_sets_own_tests_run_apart(tmp_path: Path) -> None:
    completions = {
        HUMANEVAL[0]["prompt"]: "    return a + b\n",  # passes
        HUMANEVAL[1]["prompt"]: "    return x + 2\n",  # fails its assertion
        HUMANEVAL[2]["prompt"]: "    while True:\n        pass\n",  # hangs: killed at the limit
        HUMANEVAL[3]["prompt"]: "    import os\n    os._exit(0)\n",  # exits 0 before its test ran
    }
    path = _jsonl(tmp_path / "humaneval.jsonl", HUMANEVAL)
    scores = run_suites(_Scripted(completions), {"code": path}, timeout_s=2)["code"]
    assert scores["items"] == [1.0, 0.0, 0.0, 0.0]
    assert scores["score"] == 0.25 and scores["metric"] == "pass@1" and scores["format"] == "humaneval"


def test_the_sandbox_keeps_the_evaluators_secrets_and_kills_what_the_program_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret")
    assert passes("import os\nassert 'MLFLOW_TRACKING_PASSWORD' not in os.environ\n")
    fresh = "import os\nassert sorted(os.listdir('.')) == ['program.py', 'stdout']\n"
    assert passes(fresh)  # a folder of its own, nothing of ours in it
    marker = tmp_path / "alive"
    orphan = (
        "import subprocess, sys\n"
        "late = 'import time, pathlib; time.sleep(3); pathlib.Path(%r).touch()'\n"
        f"subprocess.Popen([sys.executable, '-c', late % {str(marker)!r}])\n"
        "while True:\n    pass\n"
    )
    assert not passes(orphan, timeout_s=1)
    import time

    time.sleep(4)
    assert not marker.exists()  # its child died with it
    assert not passes("x = bytearray(2 << 30)\n")  # over the memory limit


@pytest.mark.parametrize(
    ("suite", "lines", "message"),
    [
        (
            "finance",
            ['{"text": "a", "label": "positive"}', '{"text": "b", "label": "great"}'],
            r"fpb.jsonl:2: field 'label' is 'great'; expected 0-2 \(Bearish, Bullish, Neutral\) or a sentiment",
        ),
        ("finance", ['{"sentence": "a", "label": 3}'], r"fpb.jsonl:1: field 'label' is 3; expected 0-2 or a sentiment"),
        ("finance", ['{"sentence": "a", "sentiment_score": 2.5}'], r"fpb.jsonl:1: field 'sentiment_score' is 2.5"),
        (
            "finance",
            ['{"sentence": "a", "label": 0}', "", '{"sentence": "b", "label": "positive"}'],
            r"fpb.jsonl:3: field 'label' is text here but a number on line 1",
        ),
        ("finance", ['{"text": null, "label": 1}'], r"fpb.jsonl:1: the row fits no finance format: fpb"),
        (
            "finance",
            ['{"text": "a", "label": 1}', '{"text": 7, "label": 1}'],
            r"fpb.jsonl:2: field 'text' is 7; expected text",
        ),
        ("finance", ['{"text": "a"}'], r"fpb.jsonl:1: the row fits no finance format: .*tfns \(label missing\)"),
        (
            "mmlu",
            ['{"question": "q", "choices": ["a", "b"], "answer": 2}'],
            r"fpb.jsonl:1: field 'answer' is 2; expected an option index 0-1 or one letter of AB",
        ),
        ("mmlu", ['{"question": "q", "choices": ["a", "b"], "answer": "AB"}'], r"field 'answer' is 'AB'"),
        ("mmlu", ['{"question": "q", "choices": ["a", "b"], "answer": ""}'], r"field 'answer' is ''"),
        ("mmlu", ['{"question": null, "choices": ["a", "b"], "answer": 0}'], r"fits no mmlu format: mmlu \(question"),
        (
            "medical",
            ['{"question": "q", "options": {"A": "x", "B": "y"}, "answer_idx": ["A"]}'],
            r"fpb.jsonl:1: field 'answer_idx' is \['A'\]; expected a key of 'options'",
        ),
        (
            "medical",
            ['{"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": true}'],
            r"field 'cop' is True; expected 0-3",
        ),
        (
            "medical",
            [
                '{"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 1}',
                '{"question": "q", "final_decision": "yes"}',
            ],
            r"fpb.jsonl:2: field 'opa' missing or null \(the file's rows are medmcqa rows\)",
        ),
        ("code", ['{"task_id": "t", "prompt": null, "test": "x", "entry_point": "f"}'], r"fits no code format"),
        ("code", ["[" * 100_000], r"fpb.jsonl:1: not JSON"),
        ("code", ["not json"], r"fpb.jsonl:1: not JSON"),
        ("code", [""], r"fpb.jsonl has no rows"),
        ("legal", ['{"text": "a"}'], r"evaluation suite 'legal' is unknown; choose from finance, mmlu, medical, code"),
    ],
)
def test_a_bad_suite_file_is_named_with_its_line_and_field(
    suite: str, lines: list[str], message: str, tmp_path: Path
) -> None:
    path = tmp_path / "fpb.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=message):
        check_suite_file(suite, path)


def test_a_file_that_is_not_text_or_not_a_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "fpb.jsonl"
    path.write_bytes(b'{"text": "caf\xe9", "label": 1}\n')
    with pytest.raises(InputError, match=r"evaluation suite finance: .*fpb.jsonl is not UTF-8 text \(byte 13\)"):
        check_suite_file("finance", path)
    with pytest.raises(InputError, match=r"is not a file"):
        check_suite_file("finance", tmp_path)
    path.write_text('{"text": "a\u2028b", "label": 1}\n{"text": "c", "label": "x"}\n')  # a raw U+2028 inside
    with pytest.raises(InputError, match=r"fpb.jsonl:2: field 'label' is 'x'"):  # line 2, as editors count
        check_suite_file("finance", path)


def test_a_missing_suite_file_fails_before_the_model_loads(tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = tiny_config.model_copy(
        update={"model": tiny_config.model.model_copy(update={"name_or_path": str(tmp_path / "no-model")})}
    )
    before = sorted(os.listdir(tmp_path))  # the fixture's empty MLflow store
    with pytest.raises(InputError, match=r"evaluation suite mmlu: .*mmlu.jsonl does not exist"):
        evaluate_suites(config, None, {"mmlu": tmp_path / "mmlu.jsonl"})
    assert sorted(os.listdir(tmp_path)) == before


def test_fedtune_evaluate_runs_a_suite_on_an_adapter_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`fedtune evaluate ADAPTER --suite mmlu=FILE`: the score printed, per-item results in --out;
    a bad --suite is one message (exit 2)."""
    import yaml
    from typer.testing import CliRunner

    from fedtune.config.schema import build_config
    from fedtune.model.adapters import save_state
    from fedtune.model.builder import initial_adapter_state
    from flows.cli import app
    from tests.conftest import tiny_overrides

    overrides = tiny_overrides(tmp_path, tiny_model_dir)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(overrides))
    adapter = tmp_path / "adapter.safetensors"
    save_state(initial_adapter_state(build_config(overrides))[0], adapter)
    mmlu = _jsonl(tmp_path / "mmlu.jsonl", MMLU)
    runner = CliRunner()
    args = ["evaluate", str(adapter), "-c", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "scores.json")]
    result = runner.invoke(app, [*args, "--suite", f"mmlu={mmlu}"], terminal_width=200)
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "scores.json").read_text())["mmlu"]
    assert written["n"] == 3 and len(written["items"]) == 3 and written["score"] == sum(written["items"]) / 3
    assert f'"score": {written["score"]}' in result.output
    for bad, message in ((f"{mmlu}", "expected NAME=FILE"), (f"legal={mmlu}", "evaluation suite 'legal' is unknown")):
        result = runner.invoke(app, [*args, "--suite", bad], terminal_width=200)
        assert result.exit_code == 2 and message in result.output, result.output


def test_a_run_with_a_bad_suite_file_is_refused_before_any_work(tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from flows.common import preflight

    bad = tmp_path / "mmlu.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 5}\n')
    config = tiny_config.model_copy(update={"eval": tiny_config.eval.model_copy(update={"suites": {"mmlu": str(bad)}})})
    with pytest.raises(InputError, match=r"mmlu.jsonl:1: field 'answer' is 5"):
        preflight(config)
