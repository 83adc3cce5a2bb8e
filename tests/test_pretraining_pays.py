"""The "pretraining pays" study on CPU: pretraining lowers held-out loss, fine-tuning from it trains, the script runs.

Tiny settings (a few epochs of the study's presets): these check the pipeline and the direction of the losses,
not the study's claim (docs/evaluation.md has the measured table and its command).
"""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import pays_lib as L  # noqa: E402
import pretraining_pays as study  # noqa: E402



def test_quiet_logs_silences_the_console_only_within_its_block(tmp_path):
    from mimkit.engine.logging import get_logger

    log = get_logger()
    level = log.level
    console = logging.StreamHandler(io.StringIO())  # a console handler, as get_logger's own
    file_handler = logging.FileHandler(tmp_path / "log.txt")  # as a run's log.txt
    log.addHandler(console)
    log.addHandler(file_handler)
    try:
        with L.quiet_logs():
            log.info("inside")
        with pytest.raises(RuntimeError), L.quiet_logs():
            raise RuntimeError("a failing run")
        log.info("after")
    finally:
        log.removeHandler(console)
        log.removeHandler(file_handler)
        file_handler.close()
    assert console.stream.getvalue() == "after\n"  # console quiet in the block only, restored after an error too
    assert (tmp_path / "log.txt").read_text().splitlines() == ["inside", "after"]  # a run's log.txt keeps all
    assert log.level == level  # the logger itself is never changed


def test_labelled_names_the_label_sets(tmp_path):
    assert L.labelled("digits", "all", tmp_path, seed=0) == "digits"
    root = Path(L.labelled("digits", "5pc", tmp_path, seed=3, min_train=0))
    assert root == tmp_path / "digits_5pc_seed3"
    assert sum(1 for _ in (root / "train").rglob("*.png")) == 50
    with pytest.raises(ValueError, match="label set"):
        L.labelled("digits", "half", tmp_path, seed=0)


def test_further_draws_are_other_subsets_of_the_same_size(tmp_path):
    first = Path(L.labelled("digits", "5pc", tmp_path, seed=3, min_train=0))
    second = Path(L.labelled("digits", "5pc", tmp_path, seed=3, min_train=0, draw=1))
    assert second == tmp_path / "digits_5pc_seed3_draw1"
    picked = [{p.name for p in (root / "train").rglob("*.png")} for root in (first, second)]
    assert len(picked[0]) == len(picked[1]) == 50 and picked[0] != picked[1]
    again = Path(L.labelled("digits", "5pc", tmp_path / "again", seed=3, min_train=0, draw=1))
    assert {p.name for p in (again / "train").rglob("*.png")} == picked[1]  # a draw is reproducible


def test_a_seeds_value_is_the_mean_of_its_draws():
    rows = [{"data": "d", "eval": "probe", "labels": "5pc", "init": init, "seed": seed, "draw": draw, "value": v}
            for init, base in (("pretrained", 60.0), ("random", 50.0)) for seed in (0, 1, 2)
            for draw, v in enumerate((base + seed, base + seed + 10.0))]
    (s,) = study.summarise(rows)
    assert s["draws"] == [2]
    assert s["pretrained"] == [65.0, 66.0, 67.0] and s["random"] == [55.0, 56.0, 57.0]
    assert s["diff_mean"] == pytest.approx(10.0) and s["diff_std"] == pytest.approx(0.0)
    assert "| 5 per class (mean of 2 draws) |" in study.markdown([s])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 3-epoch pretraining of the photos preset (480 crops, 32 px): checkpoint and trained model."""
    out = tmp_path_factory.mktemp("pays") / "pretrain"
    return L.pretrain("pretrain/photos.yaml", "photos", out, seed=0, **{"schedule.epochs": 3,
                                                                        "schedule.warmup_epochs": 1})


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_short_pretraining_lowers_the_heldout_reconstruction_loss(pretrained):
    before = L.heldout_loss(L.random_twin(pretrained["checkpoint"], seed=0), "photos")
    after = L.heldout_loss(pretrained["model"], "photos")
    assert after < 0.8 * before, (before, after)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_finetuning_from_the_pretrained_encoder_lowers_the_train_loss(pretrained, tmp_path):
    data = L.labelled_subset("photos", tmp_path / "sub", per_class=5, seed=0, min_train=120)
    m = L.finetune("finetune/photos.yaml", pretrained["checkpoint"], data, tmp_path / "ft", random_init=False, seed=0,
                   **{"schedule.epochs": 4, "schedule.warmup_epochs": 1})
    assert m["train_loss_last"] < m["train_loss_first"] - 0.05, m
    assert 0.0 <= m["acc1"] <= 100.0


def test_labelled_subset_keeps_n_per_class_repeated_and_val_whole(tmp_path):
    root = Path(L.labelled_subset("digits", tmp_path / "d", per_class=5, seed=1, min_train=100))
    classes = sorted(p.name for p in (root / "train").iterdir())
    assert classes == [str(c) for c in range(10)]
    for c in classes:
        files = sorted((root / "train" / c).glob("*.png"))
        assert len({f.name.split("_")[0] for f in files}) == 5  # 5 distinct labelled images
        assert len(files) == 5 * 2  # each written ceil(100 / 50) = 2 times
    assert sum(1 for _ in (root / "val").rglob("*.png")) == 360
    other = Path(L.labelled_subset("digits", tmp_path / "e", per_class=5, seed=2))
    picked = {p.name.split("_")[0] for p in (root / "train").rglob("*.png")}
    assert {p.name.split("_")[0] for p in (other / "train").rglob("*.png")} != picked  # the seed draws the subset


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_study_script_runs_end_to_end_and_writes_its_table(tmp_path):
    argv = ["--tiny", "--sets", "photos", "--seeds", "0", "--label_sets", "5pc", "--draws", "2", "--jobs", "1",
            "--out", str(tmp_path)]
    assert study.main(argv) == 0
    table = (tmp_path / "pretraining_pays.md").read_text()
    res = json.loads((tmp_path / "pretraining_pays.json").read_text())
    evals = {(s["eval"], s["labels"]) for s in res["summary"]}
    assert evals == {("recon", "none"), ("knn", "all"), ("probe", "5pc"), ("finetune", "5pc")}
    for s in res["summary"]:
        assert s["seeds"] == [0]
        assert f"| photos | {study.EVAL_NAMES[s['eval']]} | {study.LABEL_NAMES[s['labels']]}" in table
    # the few-label probe ran on 2 labelled subsets per init, the fine-tune on 1 (--finetune_draws 1)
    draws = {(r["eval"], r["init"]): sorted(x["draw"] for x in res["runs"] if (x["eval"], x["init"]) ==
                                            (r["eval"], r["init"])) for r in res["runs"] if "draw" in r}
    assert draws == {("probe", "pretrained"): [0, 1], ("probe", "random"): [0, 1],
                     ("finetune", "pretrained"): [0], ("finetune", "random"): [0]}
    assert "| 5 per class (mean of 2 draws) |" in table
    assert res["command"] == "python benchmarks/pretraining_pays.py " + " ".join(argv)  # the flags as given
    recon = next(s for s in res["summary"] if s["eval"] == "recon")
    assert recon["pretrained_mean"] < recon["random_mean"]
    # a rerun reuses every finished run
    assert study.main(argv) == 0
    assert json.loads((tmp_path / "pretraining_pays.json").read_text())["summary"] == res["summary"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_study_amp_bf16_runs_apart_from_fp32_and_compares_with_it(tmp_path):
    tiny = ["--tiny", "--sets", "photos", "--seeds", "0", "--evals", "recon", "--label_sets", "", "--jobs", "1",
            "--out", str(tmp_path)]
    assert study.main(tiny) == 0  # fp32 (the default)
    fp32_table = (tmp_path / "pretraining_pays.md").read_text()
    assert "amp off" in (tmp_path / "photos" / "seed0" / "pretrain" / "log.txt").read_text()
    assert study.main([*tiny, "--amp", "bf16"]) == 0
    assert "amp bf16" in (tmp_path / "photos" / "seed0_amp-bf16" / "pretrain" / "log.txt").read_text()
    assert (tmp_path / "pretraining_pays.md").read_text() == fp32_table  # the fp32 table is not overwritten
    res = json.loads((tmp_path / "pretraining_pays_amp-bf16.json").read_text())
    assert res["amp"] == "bf16" and [s["eval"] for s in res["summary"]] == ["recon"]
    table = (tmp_path / "pretraining_pays_amp-bf16.md").read_text()
    assert "precision: bf16" in table
    fp32 = json.loads((tmp_path / "pretraining_pays.json").read_text())["summary"][0]
    bf16 = res["summary"][0]
    row = next(x for x in table.splitlines() if x.startswith("| photos | held-out") and "| pretrained |" in x)
    assert f"{fp32['pretrained_mean']:.3f} ± 0.000 | {bf16['pretrained_mean']:.3f} ± 0.000" in row
    assert row.endswith("| 1 |")


@pytest.mark.parametrize("argv,message", [
    (["--sets", "digit"], "unknown set 'digit' (did you mean 'digits'?)"),
    (["--sets", "digits,photos"], "--sets takes names separated by spaces"),
    (["--label_sets", "5pcs"], "label set '5pcs': use all, <n>pc"),
    (["--label_sets", "all,0pc"], "label set '0pc'"),
    (["--checkpoint", "no/such/run"], "checkpoint not found: no/such/run"),
    (["--jobs", "0"], "--jobs must be at least 1"),
])
def test_bad_arguments_are_one_line_before_any_work(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        study.main([*argv, "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing was started


def test_the_table_names_the_command_and_says_what_one_seed_means(tmp_path):
    rows = [{"data": "digits", "eval": "knn", "labels": "all", "init": i, "seed": 0, "value": v}
            for i, v in (("pretrained", 90.0), ("random", 70.0))]
    table = study.markdown(study.summarise(rows))
    assert "| digits | k-NN top-1 %, k = 20 | all labels | 70.0 | 90.0 | +20.0 | 1/1 |" in table  # no "± 0.0"
    assert "one seed, so no spread" in study.caption(None, 1)
    assert "mean ± std over the seeds" in study.caption(None, 3)
    assert "--checkpoint runs/mine" in study.caption("runs/mine", 1)
