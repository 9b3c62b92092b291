import numpy as np

from adaptflow.evaluate.metrics import classification_metrics


def test_metrics_on_a_known_confusion():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    m = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    assert m["accuracy"] == 4 / 6
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["per_class"]["b"] == {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2}
    assert abs(m["macro_f1"] - np.mean([0.5, 0.8, 2 / 3])) < 1e-9


def test_classes_absent_from_the_data_still_appear():
    m = classification_metrics(np.array([0, 0]), np.array([0, 0]), ["a", "b"])
    assert m["per_class"]["b"]["support"] == 0 and m["confusion_matrix"] == [[2, 0], [0, 0]]
