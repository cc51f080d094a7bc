"""Answer extraction and accuracy for the 8 commonsense test sets, as LLM-Adapters' commonsense_evaluate.py does:
the first match of the dataset's answer words in the generated text (case-sensitive, anywhere), else "".
"""

from __future__ import annotations

import re

__all__ = ["DATASETS", "extract_answer", "check_dataset", "accuracy", "parse_options"]

# dataset -> the answer words its prompts ask for (LLM-Adapters' regex alternatives, in the same order)
DATASETS = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
    "ARC-Challenge": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ARC-Easy": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "openbookqa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
}
_PATTERNS = {name: re.compile("|".join(words)) for name, words in DATASETS.items()}


def check_dataset(name: str) -> str:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)} (names are case-sensitive)")
    return name


def extract_answer(dataset: str, text: str) -> str:
    """The predicted answer word in `text`, or "" when there is none (counted as wrong)."""
    found = _PATTERNS[check_dataset(dataset)].findall((text or "").strip())
    return found[0] if found else ""


def accuracy(predictions: list[str], labels: list[str]) -> dict:
    """{"accuracy", "correct", "total", "unparsed"}; an empty prediction is wrong and counted in unparsed."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    correct = sum(p == y and p != "" for p, y in zip(predictions, labels))
    total = len(labels)
    return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total,
            "unparsed": sum(p == "" for p in predictions)}


_OPTION = re.compile(r"\b(Answer|Solution|Ending|Option)(\d+):\s*")


def parse_options(dataset: str, instruction: str) -> tuple[str, dict[str, str]] | None:
    """(question, {answer word: option text}) from an LLM-Adapters prompt, or None when it has no such options.

    BoolQ's options are its answer words ("true", "false"). The others list "Answer1: ... Answer2: ..." (or
    Solution/Ending/Option) after the question, then "Answer format: ..."; the question is the text after the
    prompt's lead-in ("Please choose the correct answer to the question: ") up to the first option.
    """
    words = DATASETS[check_dataset(dataset)]
    body = instruction.split("\n\nAnswer format:")[0]
    if dataset == "boolq":
        question = body.split("question:", 1)[-1].strip()
        return question, {w: w for w in words}
    marks = list(_OPTION.finditer(body))
    if not marks:
        return None
    head = body[:marks[0].start()]
    question = head.split(": ", 1)[-1].strip()
    options = {}
    for m, nxt in zip(marks, marks[1:] + [None]):
        word = f"{m.group(1).lower()}{m.group(2)}"
        text = body[m.end():nxt.start() if nxt else len(body)].strip()
        if word not in words or not text:
            return None
        options[word] = text
    return (question, options) if len(options) >= 2 else None
