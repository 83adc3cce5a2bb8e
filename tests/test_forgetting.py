"""Forgetting and backward transfer on hand-made stage x domain matrices."""

import csv
import json

import pytest

from mimkit.metrics.forgetting import (
    average_forgetting,
    backward_transfer,
    forgetting,
    json_safe,
    summarize,
    write_matrix_csv,
    write_matrix_json,
)

# accuracy: rows = after stage A, B, C; columns = domains A, B, C
ACC = [
    [0.90, 0.20, 0.10],
    [0.70, 0.80, 0.30],
    [0.60, 0.85, 0.75],
]
# loss (lower is better)
LOSS = [
    [0.20, 0.90, 0.95],
    [0.40, 0.30, 0.80],
    [0.50, 0.25, 0.35],
]


def test_forgetting_accuracy() -> None:
    # A: best earlier 0.90 -> final 0.60 = 0.30; B: best earlier 0.80 -> 0.85 = -0.05; C: trained last
    f = forgetting(ACC)
    assert f[0] == pytest.approx(0.30) and f[1] == pytest.approx(-0.05) and f[2] is None
    assert average_forgetting(ACC) == pytest.approx(0.125)


def test_backward_transfer_accuracy() -> None:
    # ((0.60 - 0.90) + (0.85 - 0.80)) / 2 = -0.125
    assert backward_transfer(ACC) == pytest.approx(-0.125)


def test_lower_is_better_signs() -> None:
    # A: best earlier 0.20 -> final 0.50 = +0.30 forgotten; B: best 0.30 -> 0.25 = -0.05
    f = forgetting(LOSS, higher_is_better=False)
    assert f[0] == pytest.approx(0.30) and f[1] == pytest.approx(-0.05) and f[2] is None
    # raw ((0.50-0.20) + (0.25-0.30)) / 2 = 0.125 worse -> BWT = -0.125
    assert backward_transfer(LOSS, higher_is_better=False) == pytest.approx(-0.125)


def test_single_stage_and_nan() -> None:
    assert forgetting([[0.5, 0.4]]) == [None, None]
    assert average_forgetting([[0.5, 0.4]]) is None
    assert backward_transfer([[0.5, 0.4]]) is None
    nan = float("nan")
    m = [[nan, 0.2], [nan, 0.9]]  # domain 0 unmeasured (no labels)
    assert forgetting(m) == [None, None]
    assert backward_transfer(m) is None
    with pytest.raises(ValueError):
        backward_transfer([[0.1], [0.2]])  # 2 stages, 1 domain


def test_summary_and_writers(tmp_path) -> None:
    s = summarize(ACC, ["A", "B", "C"], metric="knn_top1")
    assert s["forgetting"]["C"] is None and s["forgetting"]["A"] == pytest.approx(0.30)
    assert s["backward_transfer"] == pytest.approx(-0.125)
    assert s["final_average"] == pytest.approx((0.60 + 0.85 + 0.75) / 3)
    assert s["stages"] == ["after_A", "after_B", "after_C"]
    c = write_matrix_csv(tmp_path / "m.csv", ACC, ["A", "B", "C"])
    rows = list(csv.reader(open(c)))
    assert rows[0] == ["stage", "A", "B", "C"]
    assert [float(v) for v in rows[2][1:]] == ACC[1] and rows[2][0] == "after_B"
    j = write_matrix_json(tmp_path / "m.json", summarize([[float("nan"), 0.1]], ["A", "B"]))
    loaded = json.loads(j.read_text())  # NaN must come out as null, not as invalid JSON
    assert loaded["matrix"] == [[None, 0.1]]


def test_json_safe_nulls_every_non_finite_float_at_any_depth() -> None:
    nan, inf = float("nan"), float("inf")
    x = {"a": nan, "b": [1.5, -inf, {"c": inf, "d": "text", "e": 2}], "f": None}
    assert json_safe(x) == {"a": None, "b": [1.5, None, {"c": None, "d": "text", "e": 2}], "f": None}
    assert json.loads(json.dumps(json_safe(x), allow_nan=False))["b"][0] == 1.5  # valid strict JSON
    assert x["a"] != x["a"]  # the input is left as it was
