"""The feedback CSV the node exports is read back by the training pipeline."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from spine_node.feedback import (
    FORMULA_STARTS,
    CorrectedLabel,
    FeedbackEntry,
    FeedbackSource,
    Verdict,
    csv_cell,
    csv_value,
    write_csv,
)
from training.feedback import (
    FeedbackCSVError,
    image_records,
    read_feedback_csv,
    reference_labels,
)


def _entry(n: int, sop: str, verdict: Verdict, status: str | None, **kw: object) -> FeedbackEntry:
    return FeedbackEntry(sop_instance_uid=sop, study_instance_uid="1.2.3", verdict=verdict,
                         model_status=status, model_score=0.5, recorded_at=1000.0 + n,
                         feedback_id=n, source=FeedbackSource.WEB, **kw)  # type: ignore[arg-type]


def test_csv_round_trip_and_reference_labels(tmp_path: Path) -> None:
    entries = [
        _entry(1, "1.1", Verdict.AGREE, "positive"),
        _entry(2, "1.2", Verdict.AGREE, "negative", reader="AB", comment='says "ok", fine'),
        _entry(3, "1.3", Verdict.DISAGREE, "negative", corrected_label=CorrectedLabel.ABNORMAL,
               lesion="Osteophytes"),
        _entry(4, "1.4", Verdict.AGREE, "not_processed"),  # no label from this
        _entry(5, "1.5", Verdict.DISAGREE, "positive"),  # no corrected label: no label
        _entry(6, "1.1", Verdict.DISAGREE, "positive", corrected_label=CorrectedLabel.NORMAL),
    ]
    csv_path = tmp_path / "feedback.csv"
    assert write_csv(entries, csv_path) == 6
    back = read_feedback_csv(csv_path)
    assert back == entries
    labels = {lab.sop_instance_uid: lab for lab in reference_labels(back)}
    assert set(labels) == {"1.1", "1.2", "1.3"}
    assert labels["1.1"].abnormal is False and labels["1.1"].verdict is Verdict.DISAGREE
    assert labels["1.2"].abnormal is False
    assert labels["1.3"].abnormal is True and labels["1.3"].lesion == "Osteophytes"
    image = tmp_path / "a.dcm"
    records = image_records(labels.values(), {"1.3": image})
    assert [(r.image_id, r.label, r.path, r.split) for r in records] == [
        ("1.3", 1, image, "feedback")]


#: Text a reader could type that a spreadsheet would run as a formula (OWASP CSV Injection).
FORMULA_TEXTS = (
    "=cmd|' /C calc'!A0",
    "+SUM(1,2)",
    "-2+3",
    "@SUM(A1)",
    "\t=1+1",
    "\r=1+1",
    "'=already quoted",  # starts with the quote itself: must still come back exactly
    "''",
    "plain, with \"quotes\" and a = inside",
)


def test_export_has_no_formula_cells_and_reads_back_the_original_values(
        tmp_path: Path) -> None:
    entries = [
        _entry(n, f"1.{n}", Verdict.AGREE, "positive", reader=text, comment=text)
        for n, text in enumerate(FORMULA_TEXTS, start=1)
    ]
    csv_path = tmp_path / "feedback.csv"
    assert write_csv(entries, csv_path) == len(FORMULA_TEXTS)
    with open(csv_path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    cells = [cell for row in rows for cell in row.values()]
    assert cells and not [c for c in cells if c.startswith(FORMULA_STARTS)]
    assert [r["comment"] for r in rows][:3] == ["'=cmd|' /C calc'!A0", "'+SUM(1,2)", "'-2+3"]
    assert rows[-1]["comment"] == FORMULA_TEXTS[-1]  # harmless text is left as it is
    assert read_feedback_csv(csv_path) == entries  # the training pipeline sees the originals
    for text in FORMULA_TEXTS:
        assert csv_value(csv_cell(text)) == text
    with pytest.raises(TypeError, match="str"):
        csv_cell(1.5)  # type: ignore[arg-type]


def test_a_file_that_is_not_an_export_is_named(tmp_path: Path) -> None:
    other = tmp_path / "other.csv"
    other.write_text("image_id,label\nx,1\n")
    with pytest.raises(FeedbackCSVError, match="columns missing"):
        read_feedback_csv(other)
    bad = tmp_path / "bad.csv"
    write_csv([_entry(1, "1.1", Verdict.AGREE, "positive")], bad)
    bad.write_text(bad.read_text().replace(",agree,", ",maybe,"))
    with pytest.raises(FeedbackCSVError, match="row 2"):
        read_feedback_csv(bad)


def test_entry_rules_name_the_bad_value() -> None:
    with pytest.raises(ValueError, match="goes with disagree"):
        _entry(1, "1.1", Verdict.AGREE, "positive", corrected_label=CorrectedLabel.NORMAL)
    with pytest.raises(ValueError, match="lesion must be one of"):
        _entry(1, "1.1", Verdict.DISAGREE, "negative", corrected_label=CorrectedLabel.ABNORMAL,
               lesion="Fracture")
    with pytest.raises(ValueError, match="goes with the corrected label abnormal"):
        _entry(1, "1.1", Verdict.DISAGREE, "positive", corrected_label=CorrectedLabel.NORMAL,
               lesion="Osteophytes")
    with pytest.raises(TypeError, match="Verdict"):
        FeedbackEntry(sop_instance_uid="1", study_instance_uid="2", verdict="agree")  # type: ignore[arg-type]
