"""Classification metrics against numbers worked out by hand."""
from __future__ import annotations

import math

import pytest

from llmscale.evaluate import classification_metrics


def test_confusion_matrix_worked_by_hand():
    # gold rows, predicted columns
    cm = [[5, 1, 0],
          [2, 3, 1],
          [0, 0, 4]]
    m = classification_metrics(cm, labels=["neg", "neu", "pos"])
    assert m["accuracy"] == pytest.approx(12 / 16) and m["examples"] == 16
    p = [5 / 7, 3 / 4, 4 / 5]  # tp / predicted
    r = [5 / 6, 3 / 6, 4 / 4]  # tp / gold
    f = [2 * a * b / (a + b) for a, b in zip(p, r)]
    assert m["precision_macro"] == pytest.approx(sum(p) / 3) and m["recall_macro"] == pytest.approx(sum(r) / 3)
    assert m["f1"] == pytest.approx(sum(f) / 3)
    assert m["per_class"]["neu"] == pytest.approx({"precision": 0.75, "recall": 0.5, "f1": 0.6, "support": 6})
    # Matthews (Gorodkin's multi-class form): (c*s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2))
    assert m["mcc"] == pytest.approx((12 * 16 - (7 * 6 + 4 * 6 + 5 * 4)) / math.sqrt((256 - 90) * (256 - 88)))


def test_binary_and_degenerate_cases():
    m = classification_metrics([[3, 1], [2, 4]])
    tp, fp, fn, tn = 4, 1, 2, 3  # class 1 as positive
    assert m["mcc"] == pytest.approx((tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    # everything predicted as one class: precision of the other is 0, MCC 0, no division error
    all_one = classification_metrics([[0, 5], [0, 5]])
    assert all_one["accuracy"] == 0.5 and all_one["mcc"] == 0.0 and all_one["per_class"]["0"]["precision"] == 0.0
    # a class absent from gold and predictions does not dilute the macro mean
    assert classification_metrics([[2, 0, 0], [0, 2, 0], [0, 0, 0]])["f1"] == 1.0


def test_best_tracker_picks_the_best_and_stops_after_patience():
    from llmscale.trainer import BestTracker

    acc = BestTracker("accuracy", patience=2)
    seen = [acc.update({"accuracy": a}, step) for step, a in ((10, 0.6), (20, 0.7), (30, 0.65), (40, 0.7), (50, 0.8))]
    assert seen == [(True, False), (True, False), (False, False), (False, True), (True, False)]
    assert acc.best == 0.8 and acc.best_step == 50  # a tie is not an improvement; patience counts from the best
    loss = BestTracker("val_loss")  # lower is better; patience 0 never stops
    assert [loss.update({"val_loss": v}, s)[0] for s, v in ((1, 2.0), (2, 1.5), (3, 1.7))] == [True, True, False]
    back = BestTracker("val_loss")
    back.load_state_dict(loss.state_dict())
    assert (back.best, back.best_step, back.bad_evals) == (1.5, 2, 1) and not any(loss.update({"val_loss": 9}, 4))
