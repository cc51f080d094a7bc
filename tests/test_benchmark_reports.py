"""Benchmark scripts' own logic: the commonsense report's statistics, and the DreamBooth grid on tiny-emoji."""

import json
import math
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


def test_style_table_shows_each_method_at_its_validation_lr_and_pairs_by_seed():
    import sd_style

    def a(values):
        import statistics

        return {"mean": statistics.fmean(values), "std": statistics.stdev(values), "values": values}

    per_lr = {m: {lr: {"test_to_twemoji": a([t, t + 0.2])} for lr, t in (("0.001", 18.0 + d), ("0.003", 17.0 + d))}
              for m, d in (("lora", 0.0), ("reflora-s", 0.5))}
    best = {m: {"lr": 0.003, "val_to_twemoji": a([16.0, 16.2]),
                "test_to_twemoji": per_lr[m]["0.003"]["test_to_twemoji"], "test_to_noto": a([15.0, 15.0]),
                "final_loss_last15": a([0.08, 0.09])} for m in per_lr}
    report = {"base": {"val_to_twemoji": 17.26, "test_to_twemoji": 18.08, "test_to_noto": 14.82}, "best": best,
              "paired_vs_lora": {"reflora-s": {"mean_diff_vs_lora": 0.5, "per_seed": [0.5, 0.5]}}, "per_lr": per_lr}
    lines = sd_style.table_md(report).splitlines()
    assert lines[2] == "| base, no LoRA | | 17.26 | **18.08** | 14.82 | | |"
    assert lines[3] == "| LoRA | 3e-3 | 16.10 | **17.10 ± 0.14** | 15.00 | 0.085 | |"
    assert lines[4] == "| RefLoRA-S | 3e-3 | 16.10 | **17.60 ± 0.14** | 15.00 | 0.085 | +0.50 (+0.50, +0.50) |"
    assert lines[-1] == ("Every lr (test → Twemoji, mean ± std at 1e-3 / 3e-3): LoRA 18.10 ± 0.14 / 17.10 ± 0.14, "
                         "RefLoRA-S 18.60 ± 0.14 / 17.60 ± 0.14.")


@pytest.mark.parametrize("report, doc", [("glue_budget.md", "llm.md"), ("sd_style.md", "sd.md")])
def test_docs_show_the_tables_the_benchmarks_last_wrote(report, doc):
    """The docs' result tables are the reports' own tables, byte for byte: a new cell or re-run that changes a report
    without the docs (or a hand edit of a number in the docs) fails here."""
    table = (REPO / "benchmarks" / "results" / report).read_text().strip()
    assert table.count("\n|") >= 3, f"{report} holds no table"
    assert table in (REPO / "docs" / doc).read_text(), (
        f"docs/{doc} does not show benchmarks/results/{report}: paste the report's table into docs/{doc}")


def test_common_cells_resume_and_outputs_are_written_whole(tmp_path):
    """A finished cell is read back instead of recomputed; JSON goes in through a temporary file and a rename, so a
    crash never leaves a half-written report; method@variant names map to the trainers' options."""
    import common

    calls = []

    def compute():
        calls.append(1)
        return {"loss": 0.5}

    first = common.cell(tmp_path / "cells" / "a.json", compute)
    again = common.cell(tmp_path / "cells" / "a.json", compute)
    assert first == ({"loss": 0.5}, True) and again == ({"loss": 0.5}, False) and len(calls) == 1
    assert [p.name for p in (tmp_path / "cells").iterdir()] == ["a.json"]  # no temporary file left
    with pytest.raises(ValueError):
        common.write_json(tmp_path / "r.json", {"x": float("nan")}, allow_nan=False)
    assert not (tmp_path / "r.json").exists()
    assert common.split_method("reflora@factors@reinit") == ("reflora", {"reflora_apply_to": "factors",
                                                                          "reinit": True})
    assert common.option_flags({"reinit": True, "reflora_apply_to": "factors"}) == [
        "--reinit", "true", "--reflora_apply_to", "factors"]
    with pytest.raises(SystemExit, match="unknown variant 'fast'"):
        common.split_method("lora@fast")
    # a refactoring warm-up of its own (the GLUE testbed's is 100 plain steps)
    assert common.split_method("reflora@warmup10") == ("reflora", {"refactor_warmup_steps": 10})


def test_lr_sweep_summary_picks_each_methods_best_rate_band_and_paired_interval():
    import lr_sweep

    def cell(method, lr, seed, losses, metric=None):
        c = {"method": method, "lr": lr, "seed": seed, "steps": 100, "final_train_loss": 0.1,
             "eval_loss": {str(s): v for s, v in zip((0, 25, 50, 100), losses)}}
        if metric is not None:  # GLUE cells carry the task's metric at each eval point
            c.update(metric_name="accuracy", metric={"100": metric})
        return c

    cells = [cell("lora", 1e-3, s, [1.0, 0.8, 0.6, 0.50 + 0.01 * s], 0.80) for s in range(3)]
    cells += [cell("lora", 1e-2, s, [1.0, 0.9, 0.9, 0.9], 0.60) for s in range(3)]
    cells += [cell("reflora", 1e-3, s, [1.0, 0.7, 0.49, 0.51 + 0.02 * s], 0.82) for s in range(3)]
    cells += [cell("reflora", 1e-2, s, [1.0, 0.7, 0.55, 0.52 + 0.01 * s], 0.81) for s in range(3)]
    report = lr_sweep.summarize(cells, tolerance=0.05)
    lora, ref = report["lora"], report["reflora"]
    assert lora["best_lr"] == 1e-3 and lora["best_eval_loss"] == pytest.approx(0.51)
    assert lora["band_width"] == 1.0  # 0.9 is far outside 5 % of 0.51
    assert ref["best_lr"] == 1e-3 and ref["best_eval_loss"] == pytest.approx(0.53)
    assert ref["good_band"] == [1e-3, 1e-2] and ref["band_width"] == pytest.approx(10.0)  # 0.53 <= 0.53 * 1.05
    # paired by seed at each method's best rate: differences 0.01, 0.02, 0.03 -> mean 0.02, t(0.975, 2) = 4.30
    diff = ref["paired_diff_to_lora"]
    half = 4.30 * 0.01 / 3 ** 0.5
    assert diff["n"] == 3 and diff["mean"] == pytest.approx(0.02)
    assert diff["ci95"] == pytest.approx([0.02 - half, 0.02 + half])
    # LoRA's final held-out loss (0.51) is reached at step 50 by RefLoRA (0.49), never by LoRA's worse seeds
    assert ref["steps_to_lora_final"] == [50, 50, 50]
    assert lora["steps_to_lora_final"] == [100, 100, None]
    assert ref["lowest_eval_loss_by_lr"][1e-3] == pytest.approx(0.49)
    assert ref["final_metric_by_lr"] == {1e-3: pytest.approx(0.82), 1e-2: pytest.approx(0.81)}
    # a diverged GLUE run (no finite dev loss, its metric None at every eval point) leaves its rate's metric out
    nan_run = {**cell("reflora-s", 1e-2, 0, [1.0, 0.9, 0.9, 0.9], 0.5), "eval_loss": {}, "metric": {"100": None}}
    both = lr_sweep.summarize([*cells, nan_run, cell("reflora-s", 1e-3, 0, [1.0, 0.7, 0.5, 0.5], 0.8)], 0.05)
    assert both["reflora-s"]["final_metric_by_lr"] == {1e-3: pytest.approx(0.8)}
    assert both["reflora-s"]["diverged_by_lr"] == {1e-2: 1}
    assert ref["metric_name"] == "accuracy"
    # at equal rates: 1e-2 pairs RefLoRA's 0.52/0.53/0.54 with LoRA's 0.9 (-0.38, -0.37, -0.36)
    at_high = ref["paired_diff_to_lora_by_lr"][1e-2]
    assert at_high["mean"] == pytest.approx(-0.37) and at_high["ci95"] == pytest.approx([-0.37 - half, -0.37 + half])
    assert ref["paired_diff_to_lora_by_lr"][1e-3]["mean"] == pytest.approx(0.02)
    # a seed only one method has run at a rate stays out of that rate's means (the others have not run it yet)
    extra = lr_sweep.summarize(cells + [cell("lora", 1e-3, 3, [1.0, 0.8, 0.6, 0.10])], tolerance=0.05)
    assert extra["lora"]["best_eval_loss"] == pytest.approx(0.51) and extra["lora"]["seeds_by_lr"][1e-3] == [0, 1, 2]
    # ... also when LoRA alone ran a pilot rate (which the others never run): they stay on the grid
    pilot = lr_sweep.summarize(cells + [cell("lora", 1e-3, 3, [1.0, 0.8, 0.6, 0.10], 0.9),
                                        cell("lora", 1e-1, 0, [1.0, 2.0, 2.0, 2.0], 0.3)], tolerance=0.05)
    assert pilot["lora"]["seeds_by_lr"] == {1e-3: [0, 1, 2], 1e-2: [0, 1, 2], 1e-1: [0]}
    assert pilot["lora"]["best_eval_loss"] == pytest.approx(0.51)
    # a variant run at one rate on one seed does not shrink the grid's seeds there; its own mean is over its seed
    variant = lr_sweep.summarize(cells + [cell("reflora@warmup10", 1e-3, 0, [1.0, 0.7, 0.5, 0.40], 0.9)], 0.05)
    assert variant["lora"]["seeds_by_lr"][1e-3] == [0, 1, 2] and variant["lora"]["best_eval_loss"] == pytest.approx(0.51)
    assert variant["reflora@warmup10"]["seeds_by_lr"] == {1e-3: [0]}
    assert variant["reflora@warmup10"]["paired_diff_to_lora_by_lr"][1e-3]["mean"] == pytest.approx(0.40 - 0.50)
    table = lr_sweep.markdown_tables(cells + [cell("reflora@warmup10", 1e-3, 0, [1.0, 0.7, 0.5, 0.40], 0.9)], variant)
    assert "| 0.001 (0, 1, 2) | 0.5100 (0.800) |" in table and "0.4000 (0.900) [seed 0]; -0.1000, one seed" in table
    # ... also a variant run at every rate on one seed of three (RefLoRA `normalize` on SmolLM2): marked, not shrinking
    wide = lr_sweep.summarize(cells + [cell("reflora@normalize", lr, 0, [1.0, 0.7, 0.5, 0.45], 0.9)
                                       for lr in (1e-3, 1e-2)], 0.05)
    assert wide["lora"]["seeds_by_lr"] == {1e-3: [0, 1, 2], 1e-2: [0, 1, 2]}
    assert wide["reflora@normalize"]["seeds_by_lr"] == {1e-3: [0], 1e-2: [0]}
    assert wide["reflora@normalize"]["paired_diff_to_lora_by_lr"][1e-2]["mean"] == pytest.approx(0.45 - 0.9)
    # a run that diverged (NaN: no held-out loss; HF's Trainer logs its loss as 0.0) is the worst, not a crash or a 0
    bad = cell("reflora-s", 1e-2, 0, [1.0], 0.32)
    bad["eval_loss"], bad["final_train_loss"] = {}, 0.0
    cells_s = [bad] + [cell("reflora-s", 1e-3, s, [1.0, 0.7, 0.6, 0.55], 0.8) for s in range(3)]
    report = lr_sweep.summarize(cells + cells_s, tolerance=0.05)["reflora-s"]
    assert report["best_lr"] == 1e-3 and report["diverged_by_lr"] == {1e-2: 1}
    assert report["mean_eval_loss_by_lr"][1e-2] == math.inf and 1e-2 not in report["final_train_loss_by_lr"]
    assert report["paired_diff_to_lora_by_lr"][1e-2] == {"mean": None, "ci95": None, "n": 0, "diverged": 1}
    assert lr_sweep.finite_or_none({"a": [math.inf, 1.0]}) == {"a": [None, 1.0]}
    # the plot's panel of paired differences: one bar per method and rate, its mean and interval, the diverged rate out
    import common

    full = lr_sweep.summarize(cells + cells_s, tolerance=0.05)
    fig, ax = common.pyplot().subplots()
    lr_sweep.paired_difference_panel(ax, full, ["reflora", "reflora-s"])
    ref_bars, s_bars = ax.containers
    assert list(ref_bars.lines[0].get_ydata()) == pytest.approx([0.02, -0.37])
    assert list(s_bars.lines[0].get_ydata()) == pytest.approx([0.04])  # 0.55 - 0.50/0.51/0.52 at 1e-3; 1e-2 diverged
    low, high = ref_bars.lines[2][0].get_segments()[1][:, 1]  # the interval drawn at 1e-2
    assert (low, high) == pytest.approx((-0.37 - half, -0.37 + half))
    common.pyplot().close(fig)


def test_lr_sweep_markdown_tables_quote_each_run_and_the_paired_means():
    import lr_sweep

    def cell(method, lr, seed, loss, metric):
        return {"method": method, "lr": lr, "seed": seed, "steps": 100, "final_train_loss": 0.1,
                "eval_loss": {"50": 1.0, "100": loss} if loss is not None else {}, "metric_name": "accuracy",
                "metric": {"100": metric}}

    cells = [cell("lora", 1e-3, s, 0.50 + 0.01 * s, 0.80) for s in range(3)]
    cells += [cell("reflora", 1e-3, s, 0.51 + 0.02 * s, 0.82) for s in range(2)]  # seed 2 not run yet
    cells += [cell("lora", 1e-2, 0, 0.90, 0.70), cell("reflora", 1e-2, 0, None, 0.68)]  # diverged
    text = lr_sweep.markdown_tables(cells, lr_sweep.summarize(cells, tolerance=0.05))
    runs, means = text.split("\n\n")
    lines = runs.splitlines()
    assert lines[0] == "| rate, seed | LoRA | RefLoRA |"  # LoRA first, then the others
    assert lines[2] == "| 0.01, 0 | 0.9000 (0.700) | diverged |"  # highest rate first
    assert lines[3] == "| 0.001, 0 | 0.5000 (0.800) | 0.5100 (0.820) |"
    assert lines[5] == "| 0.001, 2 | 0.5200 (0.800) | not run |"
    # means over the seeds both have (0, 1); paired differences 0.01 and 0.02: mean 0.015, t(0.975, 1) = 12.71
    half = lr_sweep.T95[1] * (0.01 / 2 ** 0.5) / 2 ** 0.5  # stdev of (0.01, 0.02) over sqrt(2)
    rows = means.splitlines()
    assert rows[0] == "| rate (seeds) | LoRA | RefLoRA |"
    head, interval = rows[3].rstrip(" |").rsplit(", ", 1)
    assert head == "| 0.001 (0, 1) | 0.5050 (0.800) | 0.5200 (0.820); +0.0150"
    assert [float(x) for x in interval.split("..")] == pytest.approx([0.015 - half, 0.015 + half], abs=1e-4)
    assert rows[2] == "| 0.01 (0) | 0.9000 (0.700) | diverged |"  # a diverged pair has no difference to quote


def test_lr_sweep_report_rebuilds_json_and_tables_from_the_cells_on_disk(tmp_path):
    import lr_sweep

    out = tmp_path / "sweep"
    with pytest.raises(SystemExit, match="no runs in .*run the sweep without --report first"):
        lr_sweep.main(["--data", "mrpc", "--report", "--steps", "100", "--out", str(out)])
    for method, loss in (("lora", 0.5), ("reflora", 0.48)):
        (out / "cells" / f"{method}-lr0.001-s0-n100.json").write_text(json.dumps(
            {"method": method, "lr": 1e-3, "seed": 0, "steps": 100, "final_train_loss": 0.4,
             "eval_loss": {"50": 0.7, "100": loss}, "metric_name": "accuracy", "metric": {"100": 0.8}}))
    lr_sweep.main(["--data", "mrpc", "--report", "--steps", "100", "--out", str(out)])
    assert json.loads(out.with_suffix(".json").read_text())["cells"] == 2
    table = out.with_suffix(".md").read_text()
    assert "| 0.001, 0 | 0.5000 (0.800) | 0.4800 (0.800) |" in table
    assert "| 0.001 (0) | 0.5000 (0.800) | 0.4800 (0.800); -0.0200, one seed |" in table
    assert out.with_suffix(".png").stat().st_size > 0


def test_run_parallel_runs_jobs_at_a_time_each_on_its_own_cores(tmp_path):
    import os

    import common

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs 2 cores to run 2 jobs side by side")
    probe = ("import json, os, sys, time; start = time.time(); time.sleep(0.6); "
             "json.dump({'omp': os.environ['OMP_NUM_THREADS'], 'cores': sorted(os.sched_getaffinity(0)), "
             "'start': start, 'end': time.time()}, open(sys.argv[1], 'w')); sys.exit(int(sys.argv[2]))")
    commands = [[sys.executable, "-c", probe, str(tmp_path / f"{i}.json"), str(code)]
                for i, code in enumerate([0, 0, 3])]
    ended = []
    codes = common.run_parallel(commands, 2, tmp_path / "logs", lambda i, code, s: ended.append((i, code)))
    assert codes == [0, 0, 3]
    assert sorted(ended) == [(0, 0), (1, 0), (2, 3)]
    runs = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(3)]
    share = len(cores) // 2
    assert all(r["omp"] == str(share) and len(r["cores"]) == share for r in runs)
    assert set(runs[0]["cores"]).isdisjoint(runs[1]["cores"])  # the first two ran side by side on their own cores
    assert runs[0]["start"] < runs[1]["end"] and runs[1]["start"] < runs[0]["end"]
    assert runs[2]["start"] >= min(runs[0]["end"], runs[1]["end"]) - 0.05  # the third waited for a free slot
    assert (tmp_path / "logs" / "2.log").exists()


@pytest.mark.skipif(not (REPO.parent / "shared" / "data" / "dreambooth" / "dog").is_dir(),
                    reason="needs ../shared/data/dreambooth/dog")
def test_lr_sweep_jobs_runs_the_missing_cells_as_processes_and_names_a_failed_one(tmp_path, capsys):
    import lr_sweep

    out = tmp_path / "sweep"
    flags = ["--steps", "2", "--lrs", "1e-3", "--seeds", "0", "--out", str(out), "--jobs", "2"]
    with pytest.raises(SystemExit, match=r"1 of 2 cells failed \(nosuch lr 0.001 seed 0\).*run the same command "
                                         "again to retry only these"):
        lr_sweep.main(["--methods", "lora", "nosuch", *flags])
    printed = capsys.readouterr().out
    assert "--method 'nosuch' is unknown" in printed  # the end of the failed process's output is shown
    saved = json.loads((out / "cells" / "lora-lr0.001-s0-n2.json").read_text())  # the other cell is kept
    assert (saved["method"], saved["steps"], sorted(saved["eval_loss"])) == ("lora", 2, ["0", "1", "2"])
    lr_sweep.main(["--methods", "lora", *flags])  # nothing left to run: only the report
    assert capsys.readouterr().out.startswith("0 cells to run")
    assert json.loads(out.with_suffix(".json").read_text())["cells"] == 1
