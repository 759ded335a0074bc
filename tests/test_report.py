import numpy as np

from mmcst.report import chance_map, demo_verdict, pseudo_mask


def _results(mmcst: float, cam: float, centre: float = 5.0) -> dict:
    def entry(value, steps=None, val_map=None):
        return {"result": {"best": {"miou": value}}, "train_summary": {"steps": steps, "val_map": val_map}}
    return {"methods": {"mmcst": entry(mmcst, 70, 0.12), "cam": entry(cam, 80, 0.2)},
            "references": {"centre": {"result": {"best": {"miou": centre}}}}}


def test_verdict_names_the_winner_honestly():
    assert "best validation mIoU" in demo_verdict(_results(30.0, 20.0))
    lost = demo_verdict(_results(13.6, 22.0))
    assert lost.startswith("MMCST does not win") and "cam" in lost and "70 steps" in lost
    assert "centre prior" in demo_verdict(_results(4.0, 3.0, centre=6.0))
    assert "random ranking would reach a val mAP of about 11.0" in demo_verdict(_results(13.6, 22.0), chance=0.11)


def test_chance_map_is_the_expected_ap_of_random_scores():
    rng = np.random.default_rng(0)
    labels = (rng.random((400, 5)) < np.array([0.05, 0.1, 0.2, 0.4, 0.6])).astype(np.float32)
    labels[:20] = 0  # unlabelled images are left out, as in the mAP itself
    from mmcst.engine.train import mean_average_precision
    random_maps = [mean_average_precision(rng.random(labels.shape), labels) for _ in range(200)]
    assert abs(chance_map(labels) - float(np.mean(random_maps))) < 0.003
    assert np.isnan(chance_map(np.zeros((3, 4))))


def test_pseudo_mask_ties_go_to_background():
    cam = np.array([[[0.5, 0.7]], [[0.2, 0.9]]], np.float32)  # K=2, 1x2
    mask = pseudo_mask(np.array([3, 7]), cam, threshold=0.5)
    assert mask.tolist() == [[0, 8]]
