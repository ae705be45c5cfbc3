"""One vocabulary for Meyerding grades (issue 9 point 6): every grade the grader can output
has a code in the SR, no result build raises on a grade, and no other grade can exist."""

from __future__ import annotations

import pytest

from spine_node.results import codes
from spine_node.results.builder import ResultOptions, build_results
from spine_node.results.types import MEYERDING_GRADES, CascadeResult, Finding, Status
from tests.results_kit import MODEL, dciodvfy_errors, dx_source, save_object, sr_texts

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _grader_vocabulary() -> tuple[str, ...]:
    """The grades the Meyerding grader is trained on and can return."""
    from spine_node.models import grader

    return tuple(grader.MEYERDING_GRADES)


def test_grader_vocabulary_is_the_result_vocabulary():
    assert _grader_vocabulary() == MEYERDING_GRADES == ("I", "II", "III", "IV", "V")
    assert tuple(codes.MEYERDING_GRADES) == MEYERDING_GRADES


@pytest.mark.parametrize("grade", MEYERDING_GRADES)
def test_every_grade_gets_its_code_in_the_sr(grade, tmp_path):
    source = dx_source()
    finding = Finding("Spondylolysthesis", 0.8, (10.0, 20.0, 60.0, 70.0), grade)
    result = CascadeResult(
        sop_instance_uid=str(source.SOPInstanceUID),
        status=Status.POSITIVE,
        score=0.9,
        threshold=0.5,
        findings=(finding,),
    )
    objects = build_results(source, result, MODEL, ResultOptions(gsps=True))
    path, sr = save_object(objects[0], tmp_path)
    assert dciodvfy_errors(path) == []
    code = codes.meyerding_code(grade)
    found = []

    def walk(items):
        for item in items:
            if item.get("ValueType") == "CODE":
                concept = item.ConceptCodeSequence[0]
                found.append((concept.CodeValue, concept.CodeMeaning))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    assert (code.value, f"Meyerding grade {grade}") in found
    assert sr_texts(sr)  # the report is complete, not cut short
    labels = next(o for o in objects if o.Modality == "PR").GraphicAnnotationSequence[0]
    assert labels.TextObjectSequence[0].UnformattedTextValue.endswith(f"grade {grade}")


def test_a_grade_outside_the_vocabulary_cannot_exist():
    with pytest.raises(ValueError, match="grade"):
        Finding("Spondylolysthesis", 0.8, (10.0, 20.0, 60.0, 70.0), "VI")
    with pytest.raises(ValueError, match="grade"):
        Finding("Spondylolysthesis", 0.8, (10.0, 20.0, 60.0, 70.0), "2")


def test_a_grader_file_that_could_output_another_grade_is_refused(tmp_path):
    import numpy as np
    from sklearn.ensemble import RandomForestClassifier

    from spine_node.models.grader import Grader, load_grader
    from training.meyerding import save_grader

    x = np.random.default_rng(0).random((8, 4))
    good = RandomForestClassifier(n_estimators=2, random_state=0).fit(x, ["I", "V"] * 4)
    assert load_grader(save_grader(Grader(good), tmp_path / "good.joblib")).model is not None
    bad = RandomForestClassifier(n_estimators=2, random_state=0).fit(x, ["I", "VI"] * 4)
    with pytest.raises(ValueError, match="VI"):
        load_grader(save_grader(Grader(bad), tmp_path / "bad.joblib"))
