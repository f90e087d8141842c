"""kdkit report: Table 2 layout from run folders, the t-test against a hand-worked example, Markdown / CSV output."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kdkit.cli import app
from kdkit.experiments import build_report, load_run, t_test


# --------------------------------------------------------------------------- the significance test by hand
def test_t_test_against_a_hand_worked_example() -> None:
    # a = [1, 3], b = [4, 6]: means 2 and 5, sample variances 2 and 2, pooled variance
    # ((2-1)*2 + (2-1)*2) / (2+2-2) = 2, standard error sqrt(2 * (1/2 + 1/2)) = sqrt(2),
    # t = (2 - 5) / sqrt(2) = -2.1213..., df = 2.
    # With 2 degrees of freedom the t distribution has the closed-form CDF F(t) = 1/2 + t / (2 sqrt(2 + t^2)),
    # so the two-sided p = 2 (1 - F(|t|)) = 1 - |t| / sqrt(2 + t^2) = 1 - 2.12132 / sqrt(6.5) = 0.16795...
    t_hand = -3 / math.sqrt(2)
    p_hand = 1 - abs(t_hand) / math.sqrt(2 + t_hand**2)
    result = t_test([1.0, 3.0], [4.0, 6.0])
    assert result.df == 2
    assert result.diff == pytest.approx(-3.0)
    assert result.t == pytest.approx(t_hand, rel=1e-12)
    assert result.p == pytest.approx(p_hand, rel=1e-9)
    assert p_hand == pytest.approx(0.16795, abs=1e-5)


def test_t_test_with_unequal_sizes_uses_the_pooled_variance() -> None:
    # a = [0.70, 0.72, 0.74] (mean 0.72, var 0.0004), b = [0.68, 0.70] (mean 0.69, var 0.0002);
    # pooled var = (2*0.0004 + 1*0.0002) / 3 = 0.000333..., se = sqrt(0.000333 * (1/3 + 1/2)) = 0.016667,
    # t = 0.03 / 0.016667 = 1.8 (Welch would give 0.03 / sqrt(0.0004/3 + 0.0002/2) = 1.964: a different number).
    result = t_test([0.70, 0.72, 0.74], [0.68, 0.70])
    assert result.df == 3
    assert result.t == pytest.approx(1.8, rel=1e-9)


def test_t_test_edge_cases() -> None:
    assert t_test([0.5], [0.4, 0.6]).p is None  # one value: no variance to pool
    assert t_test([0.5, 0.5], [0.5, 0.5]).p == 1.0
    assert t_test([0.6, 0.6], [0.5, 0.5]).p == 0.0


# --------------------------------------------------------------------------- fake finished runs
def _write_run(
    root: Path,
    name: str,
    values: list[float],
    *,
    fingerprint: str = "fp-polarity",
    teachers: tuple[float, ...] = (0.70, 0.74, 0.72),
    ensemble: float = 0.76,
    steps: int = 60,
    labels_only: list[float] | None = None,
    train_file: str = ".data/polarity/train.jsonl",
    num_layers: int = 1,
) -> Path:
    directory = root / name
    directory.mkdir(parents=True)

    def runs(vals: list[float]) -> dict[str, Any]:
        return {
            "runs": [
                {"seed": i + 1, "steps": steps, "metrics": {"accuracy": v, "f1": v, "macro_f1": v}}
                for i, v in enumerate(vals)
            ]
        }

    results = {
        "name": name,
        "metrics": ["accuracy", "f1", "macro_f1"],
        "data": {"fingerprint": fingerprint},
        "teachers": [
            {"key": f"{fingerprint}-t{i}", "steps": 150, "metrics": {"accuracy": a, "f1": a, "macro_f1": a}}
            for i, a in enumerate(teachers)
        ],
        "teacher_mean": {"accuracy": sum(teachers) / len(teachers)},
        "ensemble": {"accuracy": ensemble, "f1": ensemble, "macro_f1": ensemble},
        "student": runs(values),
        "labels_only": runs(labels_only) if labels_only else None,
    }
    (directory / "results.json").write_text(json.dumps(results))
    recipe = {
        "data": {"files": {"train": train_file}, "train_split": "train"},
        "teachers": {"model": {"package": "minilm_pkg", "path": "model"}, "num_layers": num_layers},
    }
    (directory / "recipe.resolved.json").write_text(json.dumps(recipe))
    return directory


def test_table_two_layout_values_and_best_row(tmp_path: Path) -> None:
    single = _write_run(tmp_path, "kd-labeled", [0.70, 0.71, 0.72], labels_only=[0.66, 0.67, 0.68])
    unikd = _write_run(tmp_path, "unikd", [0.78, 0.79, 0.80])
    other = _write_run(
        tmp_path, "unikd-sst", [0.60, 0.62], fingerprint="fp-sst", teachers=(0.5, 0.6), train_file="d/sst/t.csv"
    )
    report = build_report([load_run(single), load_run(unikd), load_run(other)])

    assert [c.label for c in report.columns] == ["polarity", "sst"]
    labels = [r.label for r in report.rows]
    assert labels[:2] == ["single teacher (mean)", "ensemble"]  # 3 teachers in one column, 2 in the other
    assert labels[2] == "labels only (same steps)"
    assert labels[3:] == ["kd-labeled", "unikd", "unikd-sst"]

    body = {row[0]: row for row in report.body()}
    # single teacher: mean of 70, 74, 72 = 72.00, sample std = 2.00; teachers' steps
    assert body["single teacher (mean)"][1:3] == ["72.00 ± 2.00", "150"]
    assert body["single teacher (mean)"][3] == "55.00 ± 7.07"  # (50, 60): mean 55, std 10/sqrt(2)
    assert body["ensemble"][1] == "76.00"
    assert body["labels only (same steps)"][1:3] == ["67.00 ± 1.00", "60"]
    assert body["kd-labeled"][1] == "71.00 ± 1.00"
    # unikd is 8 points above kd-labeled and 12 above labels-only with std 1: t = 8 / sqrt(1e-4 * 2/3) ... p < 0.05
    assert body["unikd"][1] == "79.00 ± 1.00 *"
    assert body["unikd"][3] == "-" and body["unikd-sst"][1] == "-"
    assert body["unikd-sst"][3] == "61.00 ± 1.41"

    pair = next(t for t in report.tests if {t["a"], t["b"]} == {"kd-labeled", "unikd"})
    # equal variances 1e-4: pooled 1e-4, se = sqrt(1e-4 * 2/3), t = 0.08 / se = 9.798
    sign = 1 if pair["a"] == "unikd" else -1
    assert pair["t"] == pytest.approx(sign * 0.08 / math.sqrt(1e-4 * 2 / 3), rel=1e-9)
    assert pair["df"] == 4 and pair["significant"]
    # noise: pooled std over the three rows of the polarity column is 1 point, se = 1/sqrt(3)
    noise = report.noise[0]
    assert noise["n"] == 3 and noise["pooled_std"] == pytest.approx(0.01) and noise["se"] == pytest.approx(0.01 / 3**0.5)
    # smallest significant difference: t_{0.975, 4} * 0.01 * sqrt(2/3), t_{0.975,4} = 2.776445 (printed tables)
    assert noise["detectable"] == pytest.approx(2.776445 * 0.01 * math.sqrt(2 / 3), rel=1e-5)

    md = report.markdown()
    assert "| single teacher (mean) | 72.00 ± 2.00 | 150 |" in md and "Student's t-test" in md
    rows = list(csv.DictReader(io.StringIO(report.csv())))
    unikd_row = next(r for r in rows if r["model"] == "unikd")
    assert unikd_row["data"] == "polarity" and unikd_row["best"] == "yes" and unikd_row["n"] == "3"
    assert float(unikd_row["mean"]) == pytest.approx(0.79)


def test_same_data_other_teachers_is_a_column_named_by_its_teachers(tmp_path: Path) -> None:
    # the reproduction suite's two columns: one dataset, 1-layer and 3-layer teachers (other teacher keys)
    shallow = _write_run(tmp_path / "a", "unikd", [0.70, 0.71], fingerprint="fp", num_layers=1)
    deep = _write_run(tmp_path / "b", "unikd", [0.72, 0.73], fingerprint="fp", num_layers=3)
    # other teacher keys, same data fingerprint
    results = json.loads((deep / "results.json").read_text())
    for teacher in results["teachers"]:
        teacher["key"] += "-deep"
    (deep / "results.json").write_text(json.dumps(results))

    report = build_report([load_run(shallow), load_run(deep)])

    assert [c.label for c in report.columns] == [
        "polarity, teachers 3 x minilm_pkg (1 layer)",
        "polarity, teachers 3 x minilm_pkg (3 layers)",
    ]
    assert [r.label for r in report.rows].count("unikd") == 1  # one row, a cell in each column


def test_no_star_inside_the_noise(tmp_path: Path) -> None:
    a = _write_run(tmp_path, "a", [0.70, 0.75, 0.72])
    b = _write_run(tmp_path, "b", [0.71, 0.74, 0.73])
    report = build_report([load_run(a), load_run(b)])
    assert report.best == {}
    assert all("*" not in row[1] for row in report.body())


def test_cli_report_writes_markdown_and_csv_and_refuses_unfinished_runs(tmp_path: Path) -> None:
    a = _write_run(tmp_path, "kd-labeled", [0.70, 0.71, 0.72])
    b = _write_run(tmp_path, "unikd", [0.78, 0.79, 0.80])
    runner = CliRunner()
    md, table = tmp_path / "out" / "t.md", tmp_path / "out" / "t.csv"
    result = runner.invoke(app, ["report", str(a), str(b), "--markdown", str(md), "--csv", str(table)])
    assert result.exit_code == 0, result.output
    assert "unikd" in result.output and "79.00 ± 1.00 *" in result.output
    assert "| unikd | 79.00 ± 1.00 * | 60 |" in md.read_text()
    assert table.read_text().startswith("model,kind,data,metric,n,mean,std,steps,values,best")

    unfinished = tmp_path / "running"
    unfinished.mkdir()
    (unfinished / "results.partial.json").write_text("{}")
    result = runner.invoke(app, ["report", str(a), str(unfinished)])
    assert result.exit_code == 2 and "has not finished" in result.output
    result = runner.invoke(app, ["report", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "no such run directory" in result.output
    result = runner.invoke(app, ["report", str(a), "--metric", "auc"])
    assert result.exit_code == 2 and "no metric 'auc'" in result.output


def _write_lm_run(root: Path, name: str, ppl: list[float], labels_only: list[float]) -> Path:
    """A finished causal-lm run: perplexity and next-token accuracy per seed."""
    directory = root / name
    directory.mkdir(parents=True)

    def runs(vals: list[float]) -> dict[str, Any]:
        return {
            "runs": [
                {"seed": i + 1, "steps": 120, "metrics": {"perplexity": v, "accuracy": 0.3}} for i, v in enumerate(vals)
            ]
        }

    results = {
        "name": name,
        "task": "causal-lm",
        "metrics": ["perplexity", "accuracy"],
        "data": {"fingerprint": "fp-sotu"},
        "teachers": [{"key": f"t{i}", "steps": 150, "metrics": {"perplexity": p, "accuracy": 0.3}}
                     for i, p in enumerate((60.0, 64.0))],  # fmt: skip
        "teacher_mean": {"perplexity": 62.0, "accuracy": 0.3},
        "ensemble": {"perplexity": 55.5, "accuracy": 0.31},
        "student": runs(ppl),
        "labels_only": runs(labels_only),
    }
    (directory / "results.json").write_text(json.dumps(results))
    (directory / "recipe.resolved.json").write_text(json.dumps({"data": {"files": {"train": ".data/sotu/train.jsonl"}}}))
    return directory


def test_perplexity_is_shown_as_it_is_and_lower_wins(tmp_path: Path) -> None:
    # distilled 70, 71, 72 against labels only 80, 81, 82: 10 lower with std 1 each, t = -10 / sqrt(2/3) = -12.25
    run = _write_lm_run(tmp_path, "kd", [70.0, 71.0, 72.0], labels_only=[80.0, 81.0, 82.0])
    report = build_report([load_run(run)])  # causal-lm runs: perplexity unless told
    assert report.metric == "perplexity"
    body = {row[0]: row for row in report.body()}
    assert body["single teacher (mean of 2)"][1] == "62.00 ± 2.83"  # (60, 64): std 4/sqrt(2), not in percent
    assert body["ensemble"][1] == "55.50"
    assert body["kd"][1] == "71.00 ± 1.00 *" and body["labels only (same steps)"][1] == "81.00 ± 1.00"
    [test] = report.tests
    sign = 1 if test["a"] == "kd" else -1
    assert test["t"] == pytest.approx(sign * -10 / math.sqrt(2 / 3), rel=1e-9) and test["significant"]
    assert report.best == {0: "kd"}
    assert "perplexity (lower is better)" in report.markdown()
    assert report.as_dict()["lower_is_better"] is True
    # the same runs by next-token accuracy: a share, in percent, higher wins (here a tie: no star)
    by_accuracy = build_report([load_run(run)], metric="accuracy")
    assert {row[0]: row for row in by_accuracy.body()}["kd"][1] == "30.00 ± 0.00" and by_accuracy.best == {}
