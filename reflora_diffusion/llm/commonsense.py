"""Commonsense reasoning in the LLM-Adapters format: data, evaluation by generation, LoRA training with the core.

    records = load_records("../shared/data/commonsense/boolq/train.json")
    path = find_test_file("../shared/data/commonsense", "boolq")
    metrics = evaluate_dataset(model, tokenizer, records, "boolq", "runs/x/predictions/boolq.jsonl")

The command line (`train/commonsense.py train|eval`) runs `run_train` / `run_eval` from `commonsense_run.py`.
"""

from __future__ import annotations

import json
import os

import torch
from tqdm.auto import tqdm

from reflora_diffusion.logs import get_logger

from .answers import DATASETS, accuracy, check_dataset, extract_answer, parse_options
from .prompts import RESPONSE_MARKER, eval_prompt, tokenize_example

__all__ = ["load_records", "find_test_file", "resolve_datasets", "generate", "score_options", "evaluate_dataset",
           "evaluate_datasets", "tokenize_records", "average_accuracy"]

REQUIRED_KEYS = ("instruction", "output", "answer")


def load_records(path: str, max_samples: int | None = None) -> list[dict]:
    """A JSON list (or JSON-lines file) of {instruction, input, output, answer} records, checked."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} not found; pass an LLM-Adapters JSON file "
                                "(a list of {instruction, input, output, answer})")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is neither a JSON list nor JSON lines ({e})") from None
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path} holds no records; expected a non-empty JSON list of "
                         "{instruction, input, output, answer}")
    for i, r in enumerate(records):
        missing = [k for k in REQUIRED_KEYS if not isinstance(r, dict) or k not in r]
        if missing:
            raise ValueError(f"{path}: record {i} lacks {', '.join(missing)}; each record needs "
                             "instruction, input (may be empty), output and answer")
    return records[:max_samples] if max_samples else records


def find_test_file(data_dir: str, dataset: str) -> str:
    """`<data_dir>/<dataset>/test.json`, or LLM-Adapters' `<data_dir>/dataset/<dataset>/test.json`."""
    check_dataset(dataset)
    candidates = [os.path.join(data_dir, dataset, "test.json"),
                  os.path.join(data_dir, "dataset", dataset, "test.json")]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no test file for {dataset}: looked for {candidates[0]} and {candidates[1]}; "
                            "pass --data_dir the folder that holds <dataset>/test.json")


def resolve_datasets(spec: str, data_dir: str) -> dict[str, str]:
    """"boolq", "boolq,piqa" or "all" -> {dataset: test file}. "all" takes the ones present in data_dir;
    named ones must all exist (checked before any model is loaded)."""
    if spec == "all":
        found = {}
        for name in DATASETS:
            try:
                found[name] = find_test_file(data_dir, name)
            except FileNotFoundError:
                pass
        if not found:
            raise FileNotFoundError(f"no test set found in {data_dir}; expected <dataset>/test.json for any of "
                                    f"{', '.join(DATASETS)}")
        return found
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ValueError("--dataset is empty; name one of " + ", ".join(DATASETS) + " or 'all'")
    for name in names:  # every name first: a typo is reported before a missing file
        check_dataset(name)
    return {name: find_test_file(data_dir, name) for name in names}


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, num_beams: int = 1) -> list[str]:
    """Greedy (or beam) continuations of a batch of prompts, left-padded; the text after the prompt."""
    from transformers import GenerationConfig

    tokenizer.padding_side = "left"  # generation appends on the right: pad on the left
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    config = GenerationConfig(do_sample=False, num_beams=num_beams, max_new_tokens=max_new_tokens,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    out = model.generate(**enc, generation_config=config)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    # As commonsense_evaluate.py: keep what follows the last response marker, if the model wrote one.
    return [t.split(RESPONSE_MARKER)[-1].strip() for t in texts]


OPTION_CONTEXT = "Question: {question}\nAnswer:"


@torch.no_grad()
def score_options(model, tokenizer, question: str, options: dict[str, str]) -> dict[str, float]:
    """{answer word: log p(" " + option text | "Question: <question>\nAnswer:")}, the sum over the option's tokens.

    Context and option are tokenized apart and joined (the option's tokens are exactly its own); all options of
    one question go through the model in one right-padded batch."""
    context = tokenizer(OPTION_CONTEXT.format(question=question))["input_ids"]
    words = list(options)
    conts = [tokenizer(" " + options[w], add_special_tokens=False)["input_ids"] for w in words]
    seqs = [context + c for c in conts]
    width = max(len(x) for x in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([x + [pad] * (width - len(x)) for x in seqs], device=model.device)
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in seqs], device=model.device)
    logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    scores = {}
    for row, (word, cont) in enumerate(zip(words, conts)):
        positions = torch.arange(len(context) - 1, len(context) + len(cont) - 1, device=model.device)
        targets = torch.tensor(cont, device=model.device)
        scores[word] = float(logprobs[row, positions, targets].sum())
    return scores


def _option_row(model, tokenizer, dataset: str, record: dict) -> dict:
    """The option-scoring fields of a prediction row: {} when the prompt has no options to score."""
    parsed = parse_options(dataset, record["instruction"])
    if parsed is None:
        return {}
    question, options = parsed
    scores = score_options(model, tokenizer, question, options)
    # per character as well (lm-evaluation-harness' acc_norm): long options are not penalised for their length
    norm = {w: v / max(len(" " + options[w]), 1) for w, v in scores.items()}
    return {"option_logprobs": scores, "option_pred": max(scores, key=scores.get),
            "option_pred_norm": max(norm, key=norm.get)}


def _read_predictions(path: str) -> dict[int, dict]:
    done = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut by a crash: everything before it is kept, it is redone
                done[row["index"]] = row
    return done


def evaluate_dataset(model, tokenizer, records: list[dict], dataset: str, predictions_path: str,
                     batch_size: int = 8, max_new_tokens: int = 32, num_beams: int = 1,
                     resume: bool = False, on_batch=None, score: bool = True) -> dict:
    """Accuracy of `model` on `records`, one JSON line per prediction appended to `predictions_path` as it goes.

    With `resume`, examples already in the file are not generated again. Examples are batched by prompt
    length (less padding); each line carries its index in `records`. `on_batch(metrics)` is called after
    every batch with the running (partial) metrics.

    With `score` (multiple-choice sets), each option's text is also scored by its log-likelihood given the
    question (`score_options`): the row gets `option_pred` (the likeliest option's answer word) and the metrics
    `option_accuracy` / `option_accuracy_norm` (per-character log-likelihood) beside the generated answer's.
    """
    check_dataset(dataset)
    if not resume and os.path.exists(predictions_path):
        os.remove(predictions_path)
    os.makedirs(os.path.dirname(os.path.abspath(predictions_path)), exist_ok=True)
    done = {i: row for i, row in _read_predictions(predictions_path).items()
            if i < len(records) and row["instruction"] == records[i]["instruction"]}
    if done or os.path.exists(predictions_path):  # rewrite without a cut last line or stale rows
        with open(predictions_path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(done[i]) + "\n" for i in sorted(done))
    prompts = [eval_prompt(r["instruction"], r.get("input")) for r in records]
    todo = sorted((i for i in range(len(records)) if i not in done), key=lambda i: len(prompts[i]))
    was_training = model.training
    model.eval()
    try:
        with open(predictions_path, "a", encoding="utf-8") as f:
            for start in tqdm(range(0, len(todo), batch_size), desc=f"eval {dataset}", unit="batch"):
                idx = todo[start:start + batch_size]
                outputs = generate(model, tokenizer, [prompts[i] for i in idx], max_new_tokens, num_beams)
                for i, output in zip(idx, outputs):
                    pred = extract_answer(dataset, output)
                    row = {"index": i, "instruction": records[i]["instruction"], "answer": records[i]["answer"],
                           "output_pred": output, "pred": pred, "flag": pred == records[i]["answer"] and pred != ""}
                    if score:
                        row.update(_option_row(model, tokenizer, dataset, records[i]))
                    done[i] = row
                    f.write(json.dumps(row) + "\n")
                f.flush()
                if on_batch is not None:
                    on_batch(_metrics(done, complete=False))
    finally:
        model.train(was_training)
    return _metrics(done, complete=len(done) == len(records))


def _metrics(done: dict[int, dict], complete: bool) -> dict:
    rows = list(done.values())
    m = accuracy([r["pred"] for r in rows], [r["answer"] for r in rows])
    m["complete"] = complete
    scored = [r for r in rows if "option_pred" in r]
    if scored:  # option scoring: accuracy over the examples scored (all of them, unless resumed from an old file)
        m["option_accuracy"] = sum(r["option_pred"] == r["answer"] for r in scored) / len(scored)
        m["option_accuracy_norm"] = sum(r["option_pred_norm"] == r["answer"] for r in scored) / len(scored)
        m["option_scored"] = len(scored)
    return m


def average_accuracy(datasets: dict[str, dict]) -> float | None:
    """Mean accuracy over the datasets evaluated completely (the paper's "Avg." column)."""
    accs = [m["accuracy"] for m in datasets.values() if m.get("complete")]
    return sum(accs) / len(accs) if accs else None


def evaluate_datasets(model, tokenizer, test_files: dict[str, str], output_dir: str, results: dict,
                      write_results, max_samples: int | None = None, batch_size: int = 8,
                      max_new_tokens: int = 32, num_beams: int = 1, resume: bool = False,
                      score_options: bool = True) -> dict:
    """Evaluate on each test file; `results["datasets"]` and `results["average"]` are updated and
    `write_results(results)` called after every batch, so a crash loses nothing computed."""
    results.setdefault("datasets", {})
    for name, path in test_files.items():
        records = load_records(path, max_samples)
        pred_path = os.path.join(output_dir, "predictions", f"{name}.jsonl")

        def on_batch(metrics, name=name, pred_path=pred_path):
            results["datasets"][name] = {**metrics, "predictions": os.path.relpath(pred_path, output_dir)}
            results["average"] = average_accuracy(results["datasets"])
            write_results(results)

        metrics = evaluate_dataset(model, tokenizer, records, name, pred_path, batch_size, max_new_tokens,
                                   num_beams, resume=resume, on_batch=on_batch, score=score_options)
        on_batch(metrics)
        get_logger(__name__).info(f"{name}: accuracy {metrics['accuracy']:.4f} ({metrics['correct']}/"
                                  f"{metrics['total']}, {metrics['unparsed']} without an answer)")
    return results


def tokenize_records(tokenizer, records: list[dict], max_length: int = 256, train_on_inputs: bool = False):
    """Tokenized training features and how many prompts were cut to fit max_length."""
    features, truncated = [], 0
    for r in records:
        ex = tokenize_example(tokenizer, r, max_length, train_on_inputs)
        truncated += ex.pop("truncated")
        features.append(ex)
    return features, truncated
