"""Pickled .npy files (map files, cls_labels.npy) are read without running code, and real ones still load.

Each crafted payload is first shown to run under ``np.load(allow_pickle=True)`` (it creates a marker file),
so the refusals below are refusals of working exploits.
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from numpy.lib import format as npy_format

from mmcst.data.base import DatasetError
from mmcst.data.voc import load_cls_labels
from mmcst.engine.evaluate import evaluate_maps
from mmcst.io import MapFileError, load_map, safe_load_npy, save_map


class Payload:
    """Pickles as ``function(*args)``: what a crafted file makes an unrestricted unpickler call."""

    def __init__(self, function: Callable[..., Any], *args: Any) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.function, self.args


def payloads(marker: Path) -> dict[str, Payload]:
    """Each one creates ``marker`` when unpickled."""
    evil_storage = pickle.dumps(Payload(os.system, f"touch {shlex.quote(str(marker))}"), protocol=2)
    return {
        "os.system": Payload(os.system, f"touch {shlex.quote(str(marker))}"),
        "builtins.eval": Payload(eval, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.Popen": Payload(subprocess.Popen, ["touch", str(marker)]),
        # A numpy function, nested in a list: numpy's module is not allowed wholesale.
        "numpy.savetxt": Payload(np.savetxt, str(marker), np.zeros(1)),
        # torch's own storage loader runs torch.load(weights_only=False) on these bytes.
        "torch storage bytes": Payload(torch.storage._load_from_bytes, evil_storage),
    }


def wait_for(path: Path, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds  # Popen runs its command in the background
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return path.exists()


def crafted_map(path: Path, payload: Payload, nested: bool) -> None:
    extra = [1, {"deep": payload}] if nested else payload
    np.save(path, {"keys": np.array([0], np.int64), "cam": np.zeros((1, 4, 5), np.float16), "extra": extra})


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "subprocess.Popen", "numpy.savetxt",
                                  "torch storage bytes"])
def test_crafted_map_file_runs_nothing_and_names_the_file(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "img_000.npy"
    crafted_map(path, payloads(marker)[name], nested=name == "numpy.savetxt")

    with contextlib.suppress(Exception):  # torch's loader runs the payload, then finds no magic number
        np.load(path, allow_pickle=True)  # the unrestricted reader falls for it
    assert wait_for(marker), "the payload should be a working exploit"
    marker.unlink()

    with pytest.raises(MapFileError, match="img_000.npy") as caught:
        load_map(path)
    assert "refused to load" in str(caught.value)
    time.sleep(0.1)
    assert not marker.exists()


def test_crafted_map_in_an_evaluated_folder_stops_evaluation(tmp_path: Path) -> None:
    from test_evaluate import make_voc_like

    dataset, maps_dir = make_voc_like(tmp_path, count=3)
    marker = tmp_path / "ran"
    crafted_map(maps_dir / "img_001.npy", payloads(marker)["os.system"], nested=False)
    with pytest.raises(MapFileError, match=r"img_001\.npy.*posix\.system|img_001\.npy.*os\.system"):
        evaluate_maps(maps_dir, dataset, progress=False)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["os.system", "builtins.eval"])
def test_crafted_cls_labels_file_runs_nothing(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "cls_labels.npy"
    np.save(path, {"2007_000032": np.ones(20, np.float32), "x": payloads(marker)[name]})
    with pytest.raises(DatasetError, match="cls_labels.npy") as caught:
        load_cls_labels(path, 20)
    assert caught.value.path == path
    assert not marker.exists()


def test_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "raw.npy").write_bytes(pickle.dumps({"keys": [0]}))  # a bare pickle, not an npy file
    with pytest.raises(MapFileError, match="raw.npy"):
        safe_load_npy(tmp_path / "raw.npy")
    good = io.BytesIO()
    np.save(good, {"keys": np.arange(3)})
    (tmp_path / "cut.npy").write_bytes(good.getvalue()[:-20])
    with pytest.raises(MapFileError, match="cut.npy"):
        safe_load_npy(tmp_path / "cut.npy")
    with pytest.raises(MapFileError, match="gone.npy.*not found"):
        safe_load_npy(tmp_path / "gone.npy")


# ------------------------------------------------------------------------------------------------
# legitimate files, written with the calls the projects that make them use


def test_plain_numeric_npy_loads_without_pickle(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / "a.npy", array)
    np.testing.assert_array_equal(safe_load_npy(tmp_path / "a.npy"), array)


def test_mmcst_map_file(tmp_path: Path) -> None:
    cam = np.random.default_rng(0).random((2, 6, 7))
    save_map(tmp_path / "m.npy", [4, 9], cam)
    keys, back = load_map(tmp_path / "m.npy")
    assert keys.tolist() == [4, 9]
    np.testing.assert_allclose(back, cam, atol=1e-3)


def test_irn_map_file_with_torch_tensors_reads_high_res(tmp_path: Path) -> None:
    # step/make_cam.py: keys and the stride-4 cam are torch tensors, high_res a numpy array at image size.
    generator = torch.Generator().manual_seed(0)
    label = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0])
    valid_cat = torch.nonzero(label)[:, 0]
    strided_cam = torch.rand(2, 3, 4, generator=generator)
    highres_cam = torch.rand(2, 11, 14, generator=generator)
    np.save(tmp_path / "irn.npy", {"keys": valid_cat, "cam": strided_cam.cpu(), "high_res": highres_cam.cpu().numpy()})

    keys, cam = load_map(tmp_path / "irn.npy")
    assert keys.dtype == np.int64 and keys.tolist() == [1, 4]
    assert cam.dtype == np.float32 and cam.shape == (2, 11, 14)
    np.testing.assert_array_equal(cam, highres_cam.numpy())
    raw = safe_load_npy(tmp_path / "irn.npy").item()
    assert isinstance(raw["cam"], torch.Tensor) and torch.equal(raw["cam"], strided_cam)
    assert torch.equal(raw["keys"], valid_cat)


def test_irn_file_without_high_res_reads_its_tensor_cam(tmp_path: Path) -> None:
    cam = torch.linspace(0, 1, 2 * 3 * 5).reshape(2, 3, 5)
    view = torch.rand(4, 3, 5)[1:3]  # a tensor with a storage offset, as indexing makes them
    np.save(tmp_path / "t.npy", {"keys": torch.tensor([0, 2]), "cam": cam, "view": view})
    keys, back = load_map(tmp_path / "t.npy")
    assert keys.tolist() == [0, 2]
    np.testing.assert_array_equal(back, cam.numpy())
    assert torch.equal(safe_load_npy(tmp_path / "t.npy").item()["view"], view)


def test_toco_map_file(tmp_path: Path) -> None:
    # tools/infer_seg_as_cam.py: only keys and high_res, both numpy.
    high_res = np.random.default_rng(1).random((1, 9, 10)).astype(np.float32)
    np.save(tmp_path / "toco.npy", {"keys": np.array([14]), "high_res": high_res})
    keys, cam = load_map(tmp_path / "toco.npy")
    assert keys.tolist() == [14]
    np.testing.assert_array_equal(cam, high_res)


def test_mctformer_map_file(tmp_path: Path) -> None:
    # engine.py: {class index (int): normalised HxW float32 map}.
    rng = np.random.default_rng(2)
    cam_dict = {cls_ind: rng.random((5, 6)).astype(np.float32) for cls_ind in (7, 3)}
    np.save(tmp_path / "mct.npy", cam_dict)
    keys, cam = load_map(tmp_path / "mct.npy")
    assert keys.tolist() == [3, 7]
    np.testing.assert_array_equal(cam[1], cam_dict[7])


def test_psa_cls_labels(tmp_path: Path) -> None:
    # voc12/make_cls_labels.py: {image id: float32 [20]} through np.save.
    table = {"2007_000032": np.zeros(20, np.float32), "2007_000039": np.ones(20, np.float32)}
    table["2007_000032"][[0, 14]] = 1
    np.save(tmp_path / "cls_labels.npy", table)
    labels = load_cls_labels(tmp_path / "cls_labels.npy", 20)
    assert labels.keys() == table.keys()
    for image_id, vector in table.items():
        np.testing.assert_array_equal(labels[image_id], vector)


def _npy_with_pickle(stream: bytes, version: tuple[int, int] = (1, 0)) -> bytes:
    out = io.BytesIO()
    header = {"descr": "|O", "fortran_order": False, "shape": ()}
    write = npy_format.write_array_header_1_0 if version == (1, 0) else npy_format.write_array_header_2_0
    write(out, header)
    return out.getvalue() + stream


def test_numpy1_module_paths_and_protocol_2_bytes(tmp_path: Path) -> None:
    """Files as numpy 1 wrote them under pickle protocol 2 (PSA's shipped cls_labels.npy is one)."""

    def numpy1_file(path: Path, obj: dict[str, Any]) -> Path:
        stream = pickle.dumps(np.array(obj, dtype=object), protocol=2)
        stream = stream.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        assert b"cnumpy.core.multiarray\n_reconstruct\n" in stream and b"numpy._core" not in stream
        assert b"c_codecs\nencode\n" in stream  # protocol 2 stores bytes as _codecs.encode(text, "latin1")
        path.write_bytes(_npy_with_pickle(stream))
        return path

    table = {"2008_000002": np.eye(1, 20, 3, dtype=np.float32)[0], "2008_000003": np.ones(20, np.float32)}
    labels = load_cls_labels(numpy1_file(tmp_path / "cls_labels.npy", table), 20)
    for image_id, vector in table.items():
        np.testing.assert_array_equal(labels[image_id], vector)

    scalars = numpy1_file(tmp_path / "scalars.npy", {"scale": np.float32(0.5), "n": np.int64(3)})
    assert b"cnumpy.core.multiarray\nscalar\n" in scalars.read_bytes()
    loaded = safe_load_npy(scalars).item()
    assert loaded["scale"] == np.float32(0.5) and loaded["scale"].dtype == np.float32
    assert loaded["n"] == 3 and loaded["n"].dtype == np.int64


def test_npy_version_2_header_and_numpy2_paths(tmp_path: Path) -> None:
    stream = pickle.dumps(np.array({"keys": np.array([1]), "cam": np.ones((1, 2, 3), np.float16)}, dtype=object),
                          protocol=4)
    assert b"numpy._core.multiarray" in stream or b"numpy.core.multiarray" in stream
    path = tmp_path / "v2.npy"
    path.write_bytes(_npy_with_pickle(stream, version=(2, 0)))
    keys, cam = load_map(path)
    assert keys.tolist() == [1] and cam.shape == (1, 2, 3) and cam.dtype == np.float32


def test_rebuilders_refuse_lookalike_arguments(tmp_path: Path) -> None:
    """Allowed constructors given the wrong kind of argument stop loading instead of building something else."""
    marker = tmp_path / "ran"
    rebuild = Payload(np.ndarray((0,)).__reduce__()[0], dict, (0,), b"b")  # _reconstruct(dict, ...): numpy refuses
    np.save(tmp_path / "sub.npy", {"a": rebuild})
    with pytest.raises(MapFileError, match="sub.npy"):
        safe_load_npy(tmp_path / "sub.npy")
    encode = Payload(__import__("_codecs").encode, "x", "rot13")
    np.save(tmp_path / "enc.npy", {"a": encode})
    with pytest.raises(MapFileError, match="enc.npy"):
        safe_load_npy(tmp_path / "enc.npy")
    assert not marker.exists()
