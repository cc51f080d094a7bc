"""The LLM-Adapters prompt template and tokenization with the loss on the response only.

The templates are character for character those of the code behind the paper's commonsense table
(LLM-Adapters, as used by DoRA and RefLoRA: `finetune.py` for training, `commonsense_evaluate.py` for
evaluation), including their indentation and the small whitespace differences between the two.
"""

from __future__ import annotations

__all__ = ["train_prompt", "eval_prompt", "tokenize_example", "RESPONSE_MARKER"]

RESPONSE_MARKER = "### Response:"
_INDENT = " " * 16  # the templates are indented f-strings in the original code; the indentation is part of them

_TRAIN_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n\n"
    f"{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n{_INDENT}\n"
    f"{_INDENT}### Input:\n{_INDENT}{{input}}\n{_INDENT}\n"
    f"{_INDENT}### Response:\n{_INDENT}"
)
_TRAIN_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n\n"
    f"{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n{_INDENT}\n"
    f"{_INDENT}### Response:\n{_INDENT}"
)
_EVAL_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    f"{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n\n"
    f"{_INDENT}### Input:\n{_INDENT}{{input}}\n\n"
    f"{_INDENT}### Response:\n{_INDENT}"
)
_EVAL_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n\n"
    f"{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n\n"
    f"{_INDENT}### Response:\n{_INDENT}"
)


def train_prompt(instruction: str, input: str | None = None) -> str:
    """The training prompt up to where the response starts (finetune.py's generate_prompt with output="")."""
    template = _TRAIN_WITH_INPUT if input else _TRAIN_NO_INPUT
    return template.format(instruction=instruction, input=input)


def eval_prompt(instruction: str, input: str | None = None) -> str:
    """The evaluation prompt (commonsense_evaluate.py's generate_prompt); the model continues after it."""
    template = _EVAL_WITH_INPUT if input else _EVAL_NO_INPUT
    return template.format(instruction=instruction, input=input)


def tokenize_example(tokenizer, example: dict, max_length: int = 256, train_on_inputs: bool = False) -> dict:
    """input_ids / attention_mask / labels for one {instruction, input, output} record.

    Prompt and response are tokenized apart and concatenated, so the labels are exactly the tokenized
    response (+ eos) and the prompt ends on the same tokens the model sees at evaluation. (Tokenizing the
    joined text, as LLM-Adapters does, lets a BPE merge the prompt's trailing spaces into the first answer
    token, which then gets masked or half-masked.) Labels are -100 on the prompt unless `train_on_inputs`.
    An over-long example loses the start of its prompt, never the response.
    """
    prompt_ids = tokenizer(train_prompt(example["instruction"], example.get("input")), add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(example["output"], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    if len(response_ids) >= max_length:
        raise ValueError(f"response {example['output']!r} is {len(response_ids)} tokens, longer than "
                         f"max_length={max_length}; raise --cutoff_len")
    keep = max_length - len(response_ids)
    truncated = len(prompt_ids) > keep
    if truncated:
        prompt_ids = prompt_ids[len(prompt_ids) - keep:]
    input_ids = prompt_ids + response_ids
    prompt_labels = list(prompt_ids) if train_on_inputs else [-100] * len(prompt_ids)
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids),
            "labels": prompt_labels + response_ids, "truncated": truncated}
