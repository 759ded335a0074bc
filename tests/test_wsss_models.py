"""WSSS-stage networks: ResNet-38 in PSA's layout, AffinityNet and its pair algebra, DeepLab V1/V2/V3, weight files."""
from __future__ import annotations

import hashlib
import math
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn

from mmcst.models.affinity import AffinityNet, affinity_loss, affinity_loss_terms, pairwise_affinity
from mmcst.models.deeplab import build_segmenter
from mmcst.models.resnet38 import ResNet38
from mmcst.models.weights import load_resnet38_weights
from mmcst.refine import affinity_labels, affinity_pair_indices, dense_affinity

TINY = 1 / 16  # ResNet-38 at 4 stem channels, 256 output channels


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny convolutions: one thread avoids OpenMP contention on shared 2-core machines (x50 measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# PSA's network/resnet38d.py Net, read off its __init__: conv weight shapes (out, in, kh, kw) and BN widths.


def _plain(cin: int, mid: int, cout: int, shortcut: bool) -> dict[str, tuple[int, ...]]:
    convs = {"conv_branch2a": (mid, cin, 3, 3), "conv_branch2b1": (cout, mid, 3, 3)}
    if shortcut:
        convs["conv_branch1"] = (cout, cin, 1, 1)
    return convs


PSA_CONVS: dict[str, dict[str, tuple[int, ...]]] = {
    "b2": _plain(64, 128, 128, True), "b2_1": _plain(128, 128, 128, False), "b2_2": _plain(128, 128, 128, False),
    "b3": _plain(128, 256, 256, True), "b3_1": _plain(256, 256, 256, False), "b3_2": _plain(256, 256, 256, False),
    "b4": _plain(256, 512, 512, True), **{f"b4_{i}": _plain(512, 512, 512, False) for i in range(1, 6)},
    "b5": _plain(512, 512, 1024, True), "b5_1": _plain(1024, 512, 1024, False), "b5_2": _plain(1024, 512, 1024, False),
    "b6": {"conv_branch2a": (512, 1024, 1, 1), "conv_branch2b1": (1024, 512, 3, 3),
           "conv_branch2b2": (2048, 1024, 1, 1), "conv_branch1": (2048, 1024, 1, 1)},
    "b7": {"conv_branch2a": (1024, 2048, 1, 1), "conv_branch2b1": (2048, 1024, 3, 3),
           "conv_branch2b2": (4096, 2048, 1, 1), "conv_branch1": (4096, 2048, 1, 1)},
}
PSA_BNS: dict[str, int] = {
    **{f"{block}.bn_branch2a": convs["conv_branch2a"][1] for block, convs in PSA_CONVS.items()},
    **{f"{block}.bn_branch2b1": convs["conv_branch2a"][0] for block, convs in PSA_CONVS.items()},
    "b6.bn_branch2b2": 1024, "b7.bn_branch2b2": 2048, "bn7": 4096,
}
# (stride, dilation) of PSA's convolutions where not (1, 1).
PSA_STRIDE_DILATION = {
    **{f"{b}.{c}": (2, 1) for b in ("b2", "b3", "b4") for c in ("conv_branch2a", "conv_branch1")},
    "b5.conv_branch2b1": (1, 2), "b5_1.conv_branch2a": (1, 2), "b5_1.conv_branch2b1": (1, 2),
    "b5_2.conv_branch2a": (1, 2), "b5_2.conv_branch2b1": (1, 2),
    "b6.conv_branch2b1": (1, 4), "b7.conv_branch2b1": (1, 4),
}


def psa_state_layout() -> dict[str, tuple[int, ...]]:
    layout = {"conv1a.weight": (64, 3, 3, 3)}
    layout |= {f"{block}.{conv}.weight": shape for block, convs in PSA_CONVS.items() for conv, shape in convs.items()}
    for bn, width in PSA_BNS.items():
        layout |= {f"{bn}.{name}": (width,) for name in ("weight", "bias", "running_mean", "running_var")}
        layout[f"{bn}.num_batches_tracked"] = ()
    return layout


def test_resnet38_full_width_has_psa_key_layout() -> None:
    with torch.device("meta"):
        model = ResNet38(width=1.0, freeze_bn=False)
    layout = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = psa_state_layout()
    assert sorted(set(layout) ^ set(expected)) == []
    assert {k: v for k, v in layout.items() if v != expected[k]} == {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            stride, dilation = PSA_STRIDE_DILATION.get(name, (1, 1))
            assert (module.stride[0], module.dilation[0]) == (stride, dilation), name
            assert module.padding[0] == (dilation if module.kernel_size[0] == 3 else 0), name
    assert [model.b6.dropout_2b1.p, model.b6.dropout_2b2.p, model.b7.dropout_2b1.p, model.b7.dropout_2b2.p] == [0.3, 0.3, 0.5, 0.5]
    assert math.isclose(sum(p.numel() for p in model.parameters()) / 1e6, 105.07, abs_tol=0.01)


def test_resnet38_tiny_forward_backward_at_output_stride_8() -> None:
    torch.manual_seed(0)
    model = ResNet38(width=TINY).train()
    frozen_stats = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(2, 3, 65, 50)
    features = model.forward_features(images)
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        "conv4": (2, 32, 9, 7), "conv5": (2, 64, 9, 7), "conv6": (2, 256, 9, 7)}
    assert (features["conv6"] >= 0).all()
    features["conv6"].square().mean().backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert not model.conv1a.weight.requires_grad and "conv1a.weight" not in trainable
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # frozen BN: no BN parameters left
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in trainable.values())
    # Frozen BN keeps its statistics in training mode.
    assert all(torch.equal(v, frozen_stats[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="64 \\* width"):
        ResNet38(width=0.01)


# --------------------------------------------------------------------------------------------------
# weight files in PSA's layout


def save_psa_file(path: Path, state: dict[str, torch.Tensor], legacy: bool = True) -> None:
    """As PSA's converter / a PyTorch 0.4 ``torch.save`` leave them: no BN counters, old serialisation."""
    plain = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(plain, path, _use_new_zipfile_serialization=not legacy)


@pytest.fixture()
def psa_tiny(tmp_path: Path) -> tuple[ResNet38, Path]:
    torch.manual_seed(1)
    source = ResNet38(width=TINY, freeze_bn=False)
    for module in source.modules():  # non-trivial BN statistics, so a forward depends on them
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.1, 0.1)
    state = dict(source.state_dict())
    state["fc8.weight"] = torch.randn(20, 256, 1, 1)  # res38_cls.pth carries PSA's classifier
    path = tmp_path / "res38_cls.pth"
    save_psa_file(path, state)
    return source.eval(), path


def test_psa_layout_file_lands_every_tensor(psa_tiny: tuple[ResNet38, Path], tmp_path: Path) -> None:
    source, path = psa_tiny
    psa_keys = [k for k in source.state_dict() if not k.endswith("num_batches_tracked")]
    model = ResNet38(width=TINY)
    report = load_resnet38_weights(model, path)
    assert report.loaded == len(psa_keys) and report.missing == [] and report.unexpected == ["fc8.weight"]
    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    own = model.state_dict()
    assert all(torch.equal(own[k], source.state_dict()[k]) for k in psa_keys)
    images = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), source(images))
    # The same file into the heads' containers: the backbone lands under backbone.*, the new heads stay missing.
    aff = AffinityNet(width=TINY, weights=str(path))
    assert aff.weight_reports[0].loaded == len(psa_keys)
    assert aff.weight_reports[0].missing == ["f8_3.weight", "f8_4.weight", "f8_5.weight", "f9.weight"]
    assert torch.equal(aff.backbone.b7.conv_branch2b2.weight, source.b7.conv_branch2b2.weight)
    seg = build_segmenter("deeplab_v1", 20, backbone_weights=str(path), width=TINY)
    assert sorted(seg.weight_reports[0].missing) == ["fc8_seg_conv1.bias", "fc8_seg_conv1.weight",
                                                     "fc8_seg_conv2.bias", "fc8_seg_conv2.weight"]
    # Wrapped training checkpoints with DataParallel prefixes, in the current format.
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, wrapped)
    assert load_resnet38_weights(ResNet38(width=TINY), wrapped).loaded == len(psa_keys)
    # A whole AffinityNet checkpoint (PSA's resnet38_aff.pth layout: flat keys, heads included) fills everything.
    whole = tmp_path / "resnet38_aff.pth"
    torch.save({k.removeprefix("backbone."): v for k, v in aff.state_dict().items()}, whole)
    again = load_resnet38_weights(AffinityNet(width=TINY), whole)
    assert again.missing == [] and again.unexpected == []


def test_resnet38_loader_rejects_wrong_files(psa_tiny: tuple[ResNet38, Path], tmp_path: Path) -> None:
    _, path = psa_tiny
    with pytest.raises(ValueError, match="shape"):
        load_resnet38_weights(ResNet38(width=TINY * 2), path)
    torchvision_like = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet10t").state_dict(), torchvision_like)
    with pytest.raises(ValueError, match="not a ResNet-38 in PSA's layout.*torchvision"):
        load_resnet38_weights(ResNet38(width=TINY), torchvision_like)
    mxnet = tmp_path / "ilsvrc-cls_rna-a1_cls1000_ep-0001.params"
    mxnet.write_bytes(b"\x00")
    with pytest.raises(ValueError, match="convert_mxnet_to_torch"):
        load_resnet38_weights(ResNet38(width=TINY), mxnet)
    with pytest.raises(FileNotFoundError, match="res38_cls.pth"):
        load_resnet38_weights(ResNet38(width=TINY), tmp_path / "absent.pth")


# --------------------------------------------------------------------------------------------------
# AffinityNet: affinities against brute force over pixel pairs, PSA's loss, training and groups


def brute_force_offsets(radius: int) -> list[tuple[int, int]]:
    """Every (dy, dx) after (0, 0) in raster order within the open disc of the radius."""
    return sorted((dy, dx) for dy in range(radius) for dx in range(-radius + 1, radius)
                  if dy * dy + dx * dx < radius * radius and (dy, dx) > (0, 0))


def brute_force_sources(height: int, width: int, radius: int) -> list[tuple[int, int]]:
    """Cells whose whole forward half-disc lies in the grid, raster order."""
    return [(y, x) for y in range(height) for x in range(width)
            if all(0 <= y + dy < height and 0 <= x + dx < width for dy, dx in brute_force_offsets(radius))]


@pytest.mark.parametrize("radius", [3, 5])
def test_pairwise_affinity_equals_brute_force(radius: int) -> None:
    torch.manual_seed(0)
    height, width = 7, 11
    features = torch.randn(2, 3, height, width)
    offsets, sources = brute_force_offsets(radius), brute_force_sources(height, width, radius)
    expected = torch.empty(2, len(offsets), len(sources))
    for b in range(2):
        for d, (dy, dx) in enumerate(offsets):
            for p, (y, x) in enumerate(sources):
                distance = (features[b, :, y, x] - features[b, :, y + dy, x + dx]).abs().mean()
                expected[b, d, p] = torch.exp(-distance)
    affinity = pairwise_affinity(features, radius)
    torch.testing.assert_close(affinity, expected)
    # The layout the pair labels and the dense matrix of mmcst.refine use (PSA's index_select formulation).
    origin, targets = affinity_pair_indices(height, width, radius)
    flat = features.flatten(2)
    gathered = (flat[:, :, targets] - flat[:, :, origin][:, :, None]).abs().mean(1).neg().exp()
    torch.testing.assert_close(affinity, gathered)
    with pytest.raises(ValueError, match="too small"):
        pairwise_affinity(torch.randn(1, 3, radius - 1, 20), radius)


def test_affinity_loss_terms_hand_worked() -> None:
    affinity = torch.tensor([[[0.5, 1.0, 0.25, 0.75]]])
    bg_pos, fg_pos, neg = (torch.tensor([[[1.0, 0, 0, 0]]]), torch.tensor([[[0, 1.0, 0, 1.0]]]),
                           torch.tensor([[[0, 0, 1.0, 0]]]))
    terms = affinity_loss_terms(affinity, bg_pos, fg_pos, neg, eps=0.0)
    torch.testing.assert_close(terms["bg_pos"], torch.tensor(math.log(2.0)))
    torch.testing.assert_close(terms["fg_pos"], torch.tensor(-math.log(0.75) / 2))
    torch.testing.assert_close(terms["neg"], torch.tensor(-math.log(0.75)))  # finite despite a = 1 elsewhere
    torch.testing.assert_close(affinity_loss(terms), torch.tensor(math.log(2.0) / 4 - math.log(0.75) / 8 - math.log(0.75) / 2))
    with pytest.raises(ValueError, match="same size"):
        affinity_loss_terms(affinity, bg_pos[..., :3], fg_pos, neg)


def test_affinity_net_trains_heads_and_unfrozen_backbone_with_psa_groups() -> None:
    torch.manual_seed(0)
    model = AffinityNet(width=TINY).train()
    images = torch.randn(2, 3, 72, 80)  # 9 x 10 grid: 5 x 2 sources at radius 5
    affinity = model(images)
    assert affinity.shape == (2, 34, 10) and ((affinity > 0) & (affinity <= 1)).all()
    label_maps = torch.randint(0, 3, (2, 9, 10))
    bg_pos, fg_pos, neg = (torch.stack(kind) for kind in zip(*(affinity_labels(m) for m in label_maps)))
    affinity_loss(affinity_loss_terms(affinity, bg_pos, fg_pos, neg)).backward()
    assert model.f9.weight.grad.abs().sum() > 0 and model.backbone.b3.conv_branch2a.weight.grad.abs().sum() > 0
    assert all(not p.requires_grad for name in ("conv1a", "b2", "b2_1", "b2_2")
               for p in getattr(model.backbone, name).parameters())
    groups = {g["name"]: g for g in model.param_groups(0.01, weight_decay=5e-4)}
    assert set(groups) == {"pretrained_weight", "new_weight"}  # ResNet-38 convs and PSA heads have no biases
    assert {id(p) for p in groups["new_weight"]["params"]} == {id(getattr(model, n).weight) for n in model.new_layers}
    assert groups["new_weight"]["lr"] == pytest.approx(0.1) and groups["pretrained_weight"]["lr"] == 0.01
    unfrozen = {g["name"]: g for g in AffinityNet(width=TINY, freeze_bn=False).param_groups(0.01, 5e-4)}
    assert unfrozen["pretrained_bias"]["lr"] == pytest.approx(0.02) and unfrozen["pretrained_bias"]["weight_decay"] == 0.0
    model.eval()
    with torch.no_grad():
        dense = model.dense_affinity(images)
        pairs = model(images)
    assert dense.shape == (2, 90, 90)
    torch.testing.assert_close(dense[1], dense_affinity(pairs[1], 9, 10))


def test_affinity_net_on_a_timm_resnet() -> None:
    torch.manual_seed(0)
    model = AffinityNet(backbone="resnet10t")
    assert model(torch.randn(1, 3, 72, 80)).shape == (1, 34, 10)
    assert not any(p.requires_grad for p in model.backbone.layer1.parameters())


# --------------------------------------------------------------------------------------------------
# segmenters


def test_deeplab_v1_largefov_shapes_and_lr_groups() -> None:
    torch.manual_seed(0)
    model = build_segmenter("deeplab_v1", 20, width=TINY).train()
    logits = model(torch.randn(2, 3, 65, 50))
    assert logits.shape == (2, 21, 9, 7)
    for conv in (model.fc8_seg_conv1, model.fc8_seg_conv2):
        assert (conv.kernel_size, conv.dilation, conv.padding) == ((3, 3), (12, 12), (12, 12)) and conv.bias is not None
    groups = {g["name"]: g for g in model.param_groups(7e-4)}
    head = {id(p) for n in model.new_layers for p in getattr(model, n).parameters()}
    assert {id(p) for g in ("new_weight", "new_bias") for p in groups[g]["params"]} == head
    assert all(groups[g]["lr"] == pytest.approx(7e-3) for g in ("new_weight", "new_bias"))
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    assert groups["pretrained_weight"]["lr"] == 7e-4 and len(groups["pretrained_weight"]["params"]) == len(backbone)
    assert id(model.backbone.conv1a.weight) not in {id(p) for p in groups["pretrained_weight"]["params"]}
    with torch.device("meta"):
        full = build_segmenter("deeplab_v1", 20)
    assert full.fc8_seg_conv1.weight.shape == (512, 4096, 3, 3) and full.fc8_seg_conv2.weight.shape == (21, 512, 3, 3)


def test_deeplab_v2_v3_on_a_timm_trunk_with_local_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trunk_file = tmp_path / "resnet10t.pth"
    source = timm.create_model("resnet10t", num_classes=5)
    torch.save(source.state_dict(), trunk_file)
    images = torch.randn(2, 3, 65, 50)
    v2 = build_segmenter("deeplab_v2", 20, backbone="resnet10t", backbone_weights=str(trunk_file)).eval()
    report = v2.weight_reports[0]
    assert report.missing == [] and report.loaded == len([k for k in source.state_dict()
                                                           if not k.startswith("fc.") and "num_batches" not in k])
    assert torch.equal(v2.backbone.layer4[0].conv1.weight, source.layer4[0].conv1.weight)
    with torch.no_grad():
        features = v2.features(images)
        logits = v2(images)
    assert logits.shape == (2, 21, 9, 7)
    torch.testing.assert_close(logits, sum(conv(features) for conv in v2.classifier.convs))
    assert [conv.dilation[0] for conv in v2.classifier.convs] == [6, 12, 18, 24]
    assert {g["name"]: g["lr_mult"] for g in v2.param_groups(1e-3)} == {"pretrained_weight": 1.0, "new_weight": 10.0,
                                                                         "new_bias": 20.0}
    v3 = build_segmenter("deeplab_v3", 20, backbone="resnet10t").eval()
    with torch.no_grad():
        assert v3(images).shape == (2, 21, 9, 7)
    with pytest.raises(ValueError, match="width"):
        build_segmenter("deeplab_v3", 20, width=0.5)
    with pytest.raises(ValueError, match="unknown name"):
        build_segmenter("deeplab_v4", 20)
    with pytest.raises(ValueError, match="ResNet-38"):
        build_segmenter("deeplab_v1", 20, backbone="resnet101")


def test_deeplab_v3_resnet101_equals_torchvision_and_downloads_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access while building a model")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with torch.device("meta"):
        ours = build_segmenter("deeplab_v3", 20, freeze_bn=False)
        reference = torchvision.models.segmentation.deeplabv3_resnet101(weights=None, weights_backbone=None,
                                                                         num_classes=21, aux_loss=False)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    dilations = lambda model: [m.dilation for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert dilations(ours) == dilations(reference)
