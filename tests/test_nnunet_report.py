"""Report files and ``compare`` input checks (the numbers themselves are checked against real predictions in
test_nnunet_evaluate.py)."""
from __future__ import annotations

import csv
import json

import pytest

from nnunet_gmd.cli import main
from nnunet_gmd.errors import UserError
from nnunet_gmd.report import (Report, SubsetResult, comparison_labels, compare_table, load_report,
                               to_markdown, write_report)


def _report(trainer: str, dice_wt: float, channels=("t1", "flair")) -> Report:
    subsets = [SubsetResult([channels[0]], {"whole tumor": {"dice": dice_wt, "hd95": 4.0},
                                            "enhancing tumor": {"dice": float("nan"), "hd95": float("nan")}}, 3),
               SubsetResult([channels[1]], {"whole tumor": {"dice": 0.5, "hd95": 6.0},
                                            "enhancing tumor": {"dice": 0.25, "hd95": 8.0}}, 4),
               SubsetResult(list(channels), {"whole tumor": {"dice": 0.75, "hd95": 2.0},
                                             "enhancing tumor": {"dice": 0.5, "hd95": 3.0}}, 3)]
    return Report(trainer=trainer, dataset="Dataset001_X", channels=list(channels), subsets=subsets,
                  regions=["whole tumor", "enhancing tumor"], details={"fold": 0})


def test_undefined_scores_become_null_and_are_left_out_of_means(tmp_path):
    report = _report("A", 0.25)
    assert report.mean["enhancing tumor"]["dice"] == pytest.approx(0.375)  # NaN subset skipped
    assert report.mean["whole tumor"]["hd95"] == pytest.approx(4.0)
    paths = write_report(report, tmp_path)
    saved = json.loads(paths["json"].read_text())  # strict JSON: no NaN literal
    assert saved["subsets"][0]["metrics"]["enhancing tumor"]["dice"] is None
    rows = list(csv.DictReader(paths["csv"].open()))
    assert rows[0]["enhancing tumor dice"] == "" and float(rows[0]["mean dice"]) == pytest.approx(0.25)
    assert [r["n_cases"] for r in rows] == ["3", "4", "3", ""]
    assert float(rows[1]["mean dice"]) == pytest.approx(0.375)
    assert "| t1 | 3 | 0.250 | n/a | 0.250 |" in to_markdown(report)
    assert paths["heatmap"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert oct(paths["json"].stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode
    assert saved["fold"] == 0 and [e["n_cases"] for e in saved["subsets"]] == [3, 4, 3]
    again = load_report(paths["json"])
    assert again.trainer == "A" and again.details == {"fold": 0} and again.full_set.n_cases == 3
    assert again.to_dict() == saved   # the JSON round-trips through the type unchanged


def test_compare_marks_the_best_and_rejects_mismatched_reports(tmp_path, capsys):
    a, b = tmp_path / "a" / "r.json", tmp_path / "b" / "r.json"
    write_report(_report("GMD", 0.25), a.parent)
    write_report(_report("GMD", 0.75), b.parent)
    reports = [load_report(p) for p in (a.parent / "missing_modality_report.json",
                                        b.parent / "missing_modality_report.json")]
    labels = comparison_labels(reports, [a, b])
    assert labels == ["GMD (a)", "GMD (b)"]
    table = compare_table(reports, labels, region="whole tumor")
    assert "| t1 | 0.250 | **0.750** |" in table
    assert "| **mean over subsets** | 0.500 | 0.667 |" in table

    other = tmp_path / "c"
    write_report(_report("DS", 0.5, channels=("t2", "flair")), other)
    code = main(["compare", str(a.parent / "missing_modality_report.json"),
                 str(other / "missing_modality_report.json"), "-o", str(tmp_path)])
    assert code == 2 and "only reports on the same channels compare" in capsys.readouterr().err
    code = main(["compare", str(a.parent / "missing_modality_report.json"), "--region", "edema",
                 "-o", str(tmp_path)])
    assert code == 2 and "--region 'edema' is not one of whole tumor, enhancing tumor" in capsys.readouterr().err


def test_load_report_rejects_other_files(tmp_path):
    (tmp_path / "x.json").write_text('{"mean": {}}')
    with pytest.raises(UserError, match="not a missing-modality report"):
        load_report(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_report(tmp_path / "y.json")
    with pytest.raises(UserError, match="does not exist"):
        load_report(tmp_path / "z.json")


@pytest.mark.parametrize("change, problem", [
    (lambda d: d["subsets"][0].update(available=["t2"]), "subset t2 names sequences that are not among"),
    (lambda d: d["subsets"][1].update(available=["t1"]), "subset t1 appears twice"),
    (lambda d: d["subsets"][0].update(n_cases=-1), "n_cases must be a count"),
    (lambda d: d["subsets"][0]["metrics"]["whole tumor"].update(dice=1.5), "Dice 1.5 is outside"),
    (lambda d: d["subsets"][0]["metrics"]["whole tumor"].update(dice="high"), "'high' is not a number"),
    (lambda d: d["subsets"][0]["metrics"].update(edema={"dice": 0.5}), "scores 'edema', which is not among"),
    (lambda d: d["subsets"].append({"available": ["t1"]}), "needs 'available' and 'metrics'"),
])
def test_a_damaged_report_is_refused_with_the_file_and_the_problem(tmp_path, change, problem):
    data = _report("A", 0.25).to_dict()
    change(data)
    path = tmp_path / "missing_modality_report.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError) as err:
        load_report(path)
    assert str(path) in str(err.value) and problem in str(err.value)
