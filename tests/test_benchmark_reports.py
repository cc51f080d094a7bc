"""Benchmark scripts' own logic: the commonsense report's statistics, and the DreamBooth grid on tiny-emoji."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def _cell(avg_by_set: dict, unparsed: dict, loss: float, its: float) -> dict:
    return {"datasets": avg_by_set, "unparsed": unparsed, "average": sum(avg_by_set.values()) / len(avg_by_set),
            "final_loss": loss, "it_per_s": its, "loss_curve": [[s, loss + 1.0 / s] for s in range(1, 21)]}


def test_commonsense_summary_pairs_by_seed_and_drops_sets_with_unparsed_answers():
    import commonsense_smollm as cs

    cells = {
        "lora": {"0": _cell({"a": 0.5, "b": 0.2}, {"a": 0, "b": 10}, 0.20, 4.0),
                 "1": _cell({"a": 0.6, "b": 0.0}, {"a": 0, "b": 30}, 0.22, 4.0)},
        "reflora": {"0": _cell({"a": 0.55, "b": 0.4}, {"a": 0, "b": 2}, 0.21, 3.0),
                    "1": _cell({"a": 0.58, "b": 0.3}, {"a": 0, "b": 0}, 0.22, 3.0)},
    }
    out = cs.summarize(cells)
    r, lora = out["reflora"], out["lora"]
    assert r["average"] == pytest.approx((0.475 + 0.44) / 2)
    assert r["paired_average_minus_lora"]["0"] == pytest.approx(0.475 - 0.35)
    assert r["paired_average_minus_lora"]["1"] == pytest.approx(0.44 - 0.30)
    assert r["wins_vs_lora"] == "2/2"
    # "b" had unparsed answers in some run: only "a" counts in the clean average (+0.05, -0.02 per seed)
    assert r["clean_sets"] == ["a"] and r["clean_average"] == pytest.approx(0.565)
    assert r["paired_clean_mean"] == pytest.approx(0.015)
    assert r["it_per_s_ratio_to_lora"] == pytest.approx(0.75) and lora["paired_mean"] == 0
    assert r["loss_at"]["100%"] == pytest.approx(sum(0.215 + 1.0 / s for s in range(16, 21)) / 5)


def test_dreambooth_on_tiny_emoji_writes_the_compare_grid(tmp_path):
    from PIL import Image

    import sd_dreambooth

    out = tmp_path / "db"
    report = sd_dreambooth.main(["--base", "tiny-emoji", "--methods", "lora", "reflora", "--steps", "4",
                                 "--warmup", "2", "--timing_rounds", "1", "--timing_steps", "1",
                                 "--grid_prompts", "dog face", "--grid_seeds", "0", "--out", str(out)])
    assert report["setup"]["base"] == "tiny-emoji" and set(report["methods"]) == {"lora", "reflora"}
    assert json.loads(out.with_suffix(".json").read_text())["setup"]["steps"] == 4
    grid = Image.open(out.with_name("db_grid.png"))
    assert grid.height == 64 + 3 * (192 + 4)  # header + base, lora, reflora rows (compare.make_grid's layout)
