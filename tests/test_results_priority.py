"""Study priority from all images of a study."""

from __future__ import annotations

import pytest

from spine_node.results.priority import StudyPriority, level_text, study_priority
from spine_node.results.types import CascadeResult, Status


def _r(uid: str, status: Status, score: float | None = None) -> tuple[str, CascadeResult]:
    reason = "unreadable" if status is Status.NOT_PROCESSED else None
    return uid, CascadeResult(
        sop_instance_uid=uid, status=status, score=score, reason=reason, threshold=0.5
    )


def test_any_positive_is_abnormal_with_highest_score():
    p = study_priority(
        [
            _r("1.1", Status.NEGATIVE, 0.2),
            _r("1.2", Status.POSITIVE, 0.8),
            _r("1.3", Status.NOT_PROCESSED),
        ]
    )
    assert (p.level, p.max_score, p.n_images, p.n_positive, p.n_not_processed) == (
        Status.POSITIVE,
        0.8,
        3,
        1,
        1,
    )


def test_all_negative_is_normal():
    p = study_priority([_r("1.1", Status.NEGATIVE, 0.2), _r("1.2", Status.NEGATIVE, 0.3)])
    assert (p.level, p.max_score, p.n_positive) == (Status.NEGATIVE, 0.3, 0)


def test_only_not_processed_and_mixed_unread_are_not_processed():
    p = study_priority([_r("1.1", Status.NOT_PROCESSED)])
    assert (p.level, p.max_score, p.n_not_processed) == (Status.NOT_PROCESSED, None, 1)
    mixed = study_priority([_r("1.1", Status.NEGATIVE, 0.1), _r("1.2", Status.NOT_PROCESSED)])
    assert mixed.level is Status.NOT_PROCESSED


def test_retry_of_same_image_counts_once_last_wins():
    p = study_priority([_r("1.1", Status.NOT_PROCESSED), _r("1.1", Status.POSITIVE, 0.9)])
    assert (p.level, p.n_images, p.n_not_processed) == (Status.POSITIVE, 1, 0)


def test_sort_key_orders_worklist():
    a = study_priority([_r("1", Status.POSITIVE, 0.6)])
    b = study_priority([_r("2", Status.POSITIVE, 0.95)])
    n = study_priority([_r("3", Status.NEGATIVE, 0.1)])
    u = study_priority([_r("4", Status.NOT_PROCESSED)])
    assert sorted([n, a, u, b], key=lambda p: p.sort_key) == [b, a, u, n]
    assert "1 of 1 images positive" in b.summary()
    assert b.summary().startswith("Study priority: abnormal;")  # displayed words
    assert n.to_json() == {"level": "negative", "max_score": 0.1, "n_images": 1,
                           "n_positive": 0, "n_not_processed": 0}
    assert [level_text(p.level) for p in (b, u, n)] == ["abnormal", "not processed", "normal"]


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least one"):
        study_priority([])
    with pytest.raises(TypeError, match="pair"):
        study_priority([("1.1",)])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="CascadeResult"):
        study_priority([("1.1", "positive")])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        study_priority("1.1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="level"):
        StudyPriority("abnormal", None, 1, 0, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_positive"):
        StudyPriority(Status.POSITIVE, 0.5, 1, 2, 0)
