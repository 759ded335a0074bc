import numpy as np

from mmcst.report import demo_verdict, pseudo_mask


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


def test_pseudo_mask_ties_go_to_background():
    cam = np.array([[[0.5, 0.7]], [[0.2, 0.9]]], np.float32)  # K=2, 1x2
    mask = pseudo_mask(np.array([3, 7]), cam, threshold=0.5)
    assert mask.tolist() == [[0, 8]]
