"""Classification metrics of the training monitor."""
from __future__ import annotations

import numpy as np

from mmcst.metrics.classification import chance_map, mean_average_precision


def test_chance_map_is_the_expected_ap_of_random_scores():
    rng = np.random.default_rng(0)
    labels = (rng.random((400, 5)) < np.array([0.05, 0.1, 0.2, 0.4, 0.6])).astype(np.float32)
    labels[:20] = 0  # unlabelled images are left out, as in the mAP itself
    random_maps = [mean_average_precision(rng.random(labels.shape), labels) for _ in range(200)]
    assert abs(chance_map(labels) - float(np.mean(random_maps))) < 0.003
    assert np.isnan(chance_map(np.zeros((3, 4))))

