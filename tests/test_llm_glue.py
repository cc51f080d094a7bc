"""GLUE loaders (real files in ../shared/data/glue, fixtures in the real layout for QQP/MNLI/QNLI), metrics
checked against hand-computed values, and the errors a user sees."""

import os
import subprocess
import sys

import pytest

from reflora_diffusion.llm.glue import PRESETS, TASKS, load_glue, parse_args
from reflora_diffusion.llm.metrics import glue_metrics, main_value

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLUE = os.path.join(os.path.dirname(ROOT), "shared", "data", "glue")
needs_glue = pytest.mark.skipif(not os.path.isdir(GLUE), reason="../shared/data/glue not present")


# ---- real files ---------------------------------------------------------------------------------------------

@needs_glue
@pytest.mark.parametrize("task,n_train,n_dev,first", [
    # first dev row, read by hand from the TSV
    ("cola", 8551, 1043, ("The sailors rode the breeze clear of the rocks.", None, 1)),
    ("sst2", 1000, 872, ("it 's a charming and often affecting journey . ", None, 1)),
    # MRPC: the header starts with a UTF-8 BOM, and the second sentence opens with an unmatched quote
    ("mrpc", 3668, 408, ("He said the foodservice pie business doesn't fit the company's long-term growth strategy.",
                         '"The foodservice pie business does not fit our long-term growth strategy.', 1)),
    ("stsb", 5749, 1500, ("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0)),
    ("rte", 2490, 277, ("Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
                        "according to the Christopher Reeve Foundation.", "Christopher Reeve had an accident.", 1)),
])
def test_real_glue_files(task, n_train, n_dev, first):
    data = load_glue(task, GLUE)
    assert set(data) == {"train", "validation"}
    assert (len(data["train"]), len(data["validation"])) == (n_train, n_dev)
    row = data["validation"][0]
    assert (row["text_a"], row["text_b"], row["label"]) == first
    labels = set(data["train"]["label"])
    if task == "stsb":
        assert min(labels) >= 0.0 and max(labels) <= 5.0 and len(labels) > 10
    else:
        assert labels == {0, 1}


@needs_glue
def test_task_folder_subset_and_aliases():
    # --data_dir may be the task's own folder; names are case/dash-insensitive; subsets are fixed per subset_seed
    a = load_glue("STS-B", os.path.join(GLUE, "STS-B"), max_train_samples=20, max_eval_samples=7)
    b = load_glue("stsb", GLUE, max_train_samples=20, max_eval_samples=7)
    assert (len(a["train"]), len(a["validation"])) == (20, 7)
    assert a["train"]["text_a"] == b["train"]["text_a"]
    assert load_glue("stsb", GLUE, max_train_samples=20, subset_seed=1)["train"]["text_a"] != b["train"]["text_a"]


# ---- fixtures in the real GLUE layout (QQP, MNLI, QNLI are not in shared/) -----------------------------------

def _write(folder, name, lines):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
        f.write("\n".join("\t".join(cells) for cells in lines) + "\n")


QQP_HEADER = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
QNLI_HEADER = ["index", "question", "sentence", "label"]
MNLI_COLS = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
             "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]


def _mnli_row(i, s1, s2, labels):
    return [str(i), "1", f"{i}n", "slate", f"( ( {s1} ) )", f"( {s2} )", f"(ROOT (S {s1}))", f"(ROOT {s2})",
            s1, s2, *labels]


@pytest.fixture
def glue_fixture(tmp_path):
    root = str(tmp_path / "glue")
    qqp = [QQP_HEADER, ["0", "1", "2", "How do I learn Python?", "What is the best way to learn Python?", "1"],
           ["1", "3", "4", 'Why is the sky "blue"?', "How tall is Everest?", "0"]]
    _write(os.path.join(root, "QQP"), "train.tsv", qqp)
    _write(os.path.join(root, "QQP"), "dev.tsv", qqp[:2])
    qnli = [QNLI_HEADER, ["0", "When was it built?", "It was built in 1900.", "entailment"],
            ["1", "Who won?", "The sky is blue.", "not_entailment"]]
    _write(os.path.join(root, "QNLI"), "train.tsv", qnli)
    _write(os.path.join(root, "QNLI"), "dev.tsv", qnli)
    mnli = os.path.join(root, "MNLI")
    _write(mnli, "train.tsv", [MNLI_COLS + ["label1", "gold_label"],
                               _mnli_row(0, "Conceptually cream skimming has two dimensions.",
                                         "Product and geography are what make cream skimming work.",
                                         ["neutral", "neutral"]),
                               _mnli_row(1, "You lose the things to the following level.",
                                         "You keep the things.", ["contradiction", "contradiction"])])
    dev_cols = MNLI_COLS + ["label1", "label2", "label3", "label4", "label5", "gold_label"]
    _write(mnli, "dev_matched.tsv", [dev_cols, _mnli_row(0, "The new rights are nice enough",
                                                         "Everyone really likes the newest benefits",
                                                         ["neutral", "entailment", "neutral", "neutral", "neutral",
                                                          "neutral"])])
    _write(mnli, "dev_mismatched.tsv", [dev_cols, _mnli_row(0, "Your contribution helped make it possible.",
                                                            "Your contributions were of no help.",
                                                            ["contradiction"] * 5 + ["contradiction"]),
                                        _mnli_row(1, "It is raining.", "It is wet outside.",
                                                  ["entailment"] * 5 + ["entailment"])])
    return root


def test_fixture_tasks(glue_fixture):
    qqp = load_glue("qqp", glue_fixture)
    assert qqp["train"]["label"] == [1, 0] and qqp["train"]["text_a"][1] == 'Why is the sky "blue"?'
    qnli = load_glue("qnli", glue_fixture)
    assert qnli["validation"]["label"] == [0, 1] and qnli["validation"]["text_b"][0] == "It was built in 1900."
    mnli = load_glue("mnli", glue_fixture)
    assert set(mnli) == {"train", "validation_matched", "validation_mismatched"}
    # label ids in the hub's order: entailment 0, neutral 1, contradiction 2; text from sentence1/2, not parses
    assert mnli["train"]["label"] == [1, 2]
    assert mnli["validation_matched"][0] == {"text_a": "The new rights are nice enough",
                                             "text_b": "Everyone really likes the newest benefits", "label": 1}
    assert mnli["validation_mismatched"]["label"] == [2, 0]


# ---- metrics: hand-computed values --------------------------------------------------------------------------

def test_matthews_correlation():
    # TP=2, FP=1, TN=2, FN=0: (2*2 - 1*0) / sqrt(3*2*3*2) = 4/6
    m = glue_metrics("cola", [1, 1, 0, 0, 1], [1, 0, 0, 0, 1])
    assert m["matthews_correlation"] == pytest.approx(2 / 3)
    assert glue_metrics("cola", [1, 1, 1], [1, 0, 1])["matthews_correlation"] == 0.0  # constant prediction


def test_accuracy_from_logits():
    logits = [[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]  # argmax 0, 1, 0
    for task in ("sst2", "qnli", "rte"):
        assert glue_metrics(task, logits, [0, 1, 1]) == {"accuracy": pytest.approx(2 / 3)}
    assert glue_metrics("mnli", [[0, 0, 9], [9, 0, 0]], [2, 1]) == {"accuracy": 0.5}


def test_accuracy_and_f1():
    # TP=2, FP=1, FN=1: precision = recall = 2/3 -> F1 2/3; 3 of 5 right
    for task in ("mrpc", "qqp"):
        m = glue_metrics(task, [1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
        assert m["accuracy"] == pytest.approx(0.6)
        assert m["f1"] == pytest.approx(2 / 3)
        assert m["combined_score"] == pytest.approx((0.6 + 2 / 3) / 2)


def test_pearson_spearman():
    # deviations (-1.5,-.5,.5,1.5) and (-1.75,-.75,.25,2.25): r = 6.5 / sqrt(5 * 8.75)
    m = glue_metrics("stsb", [[1.0], [2.0], [3.0], [4.0]], [1.0, 2.0, 3.0, 5.0])
    assert m["pearson"] == pytest.approx(6.5 / (5 * 8.75) ** 0.5)
    assert m["spearmanr"] == pytest.approx(1.0)
    # one swapped pair: 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 12 / 60
    assert glue_metrics("stsb", [1.0, 3.0, 2.0, 4.0], [1.0, 2.0, 3.0, 4.0])["spearmanr"] == pytest.approx(0.8)


def test_main_value_picks_headline_metric():
    assert main_value("mnli", {"eval_matched_accuracy": 0.8, "eval_mismatched_accuracy": 0.7}) == 0.8
    assert main_value("stsb", {"eval_pearson": 0.5, "eval_spearmanr": 0.4}) == 0.5
    assert main_value("cola", {"eval_loss": 1.0}) is None


# ---- presets and arguments ----------------------------------------------------------------------------------

def test_presets_cover_all_tasks_and_explicit_flags_win():
    assert set(PRESETS) == {"paper", "adalora"}
    assert all(set(rows) == set(TASKS) for rows in PRESETS.values())
    glue_args, train_args = parse_args(["--task_name", "rte", "--model_name_or_path", "m", "--output_dir", "o",
                                        "--preset", "adalora", "--num_train_epochs", "2"])
    assert train_args.num_train_epochs == 2                               # explicit flag kept
    assert train_args.warmup_steps == 200 and glue_args.max_length == 320  # AdaLoRA's RTE row
    assert glue_args.cls_dropout == 0.2 and train_args.learning_rate == 1e-3
    assert glue_args.refactor_warmup_steps == 100 and glue_args.lora_r == 8
    assert glue_args.target_modules is None                               # the default targets
    with pytest.raises(ValueError, match="unknown --preset 'adaloraa'; choose one of: paper, adalora"):
        parse_args(["--task_name", "rte", "--model_name_or_path", "m", "--output_dir", "o", "--preset", "adaloraa"])


# ---- bad input ----------------------------------------------------------------------------------------------

def test_unknown_task():
    with pytest.raises(ValueError, match="unknown GLUE task 'wnlii'; choose one of: cola, sst2"):
        load_glue("wnlii", GLUE)


@needs_glue
def test_missing_split(tmp_path):
    os.makedirs(tmp_path / "RTE")
    with open(os.path.join(GLUE, "RTE", "train.tsv")) as src, open(tmp_path / "RTE" / "train.tsv", "w") as dst:
        dst.write(src.read())
    with pytest.raises(FileNotFoundError, match=r"missing the rte validation split \(dev.tsv\)"):
        load_glue("rte", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_glue("rte", str(tmp_path / "nope"))


def test_label_outside_label_set(tmp_path):
    _write(str(tmp_path / "RTE"), "train.tsv", [["index", "sentence1", "sentence2", "label"],
                                                ["0", "a", "b", "entailment"], ["1", "c", "d", "maybe"]])
    with pytest.raises(ValueError, match=r"train.tsv:3: label 'maybe' is not one of \['entailment', "
                                         r"'not_entailment'\] for task rte"):
        load_glue("rte", str(tmp_path), splits=["train"])
    _write(str(tmp_path / "STS-B"), "train.tsv", [["sentence1", "sentence2", "score"], ["a", "b", "7.5"]])
    with pytest.raises(ValueError, match=r"label '7.5' is not a score in \[0, 5\]"):
        load_glue("stsb", str(tmp_path), splits=["train"])


def test_cli_errors_are_one_line(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "train", "glue.py"), "--model_name_or_path", "m",
           "--output_dir", str(tmp_path / "o")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    bad_task = subprocess.run(cmd + ["--task_name", "wnlii"], capture_output=True, text=True, env=env)
    assert bad_task.returncode != 0
    assert bad_task.stderr.strip().splitlines()[-1].startswith("error: unknown GLUE task 'wnlii'")
    assert "Traceback" not in bad_task.stderr
    bad_dir = subprocess.run(cmd + ["--task_name", "rte", "--data_dir", str(tmp_path / "none")],
                             capture_output=True, text=True, env=env)
    assert bad_dir.returncode != 0 and "Traceback" not in bad_dir.stderr
    assert bad_dir.stderr.strip().splitlines()[-1].startswith(f"error: GLUE data folder {tmp_path / 'none'}")


def test_hub_columns_map_to_the_same_schema(monkeypatch):
    # No network here: stand in for load_dataset("nyu-mll/glue", "mnli") with the hub's real column layout.
    import datasets

    def fake_load_dataset(path, name):
        assert (path, name) == ("nyu-mll/glue", "mnli")
        split = lambda n: datasets.Dataset.from_dict({"premise": ["p"] * n, "hypothesis": ["h"] * n,  # noqa: E731
                                                      "label": [2] * n, "idx": list(range(n))})
        return datasets.DatasetDict({"train": split(3), "validation_matched": split(2),
                                     "validation_mismatched": split(1)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_glue("mnli", None)
    assert {k: len(v) for k, v in data.items()} == {"train": 3, "validation_matched": 2, "validation_mismatched": 1}
    assert data["train"][0] == {"text_a": "p", "text_b": "h", "label": 2}
