"""Answer extraction and accuracy for the 8 commonsense test sets, as LLM-Adapters' commonsense_evaluate.py does:
the first match of the dataset's answer words in the generated text (case-sensitive, anywhere), else "".
"""

from __future__ import annotations

import re

__all__ = ["DATASETS", "extract_answer", "check_dataset", "accuracy"]

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
