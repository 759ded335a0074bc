import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mmcst.io import (MapFileError, atomic_open, atomic_write_json, export_mctformer_map, load_label_png, load_map,
                      save_label_png, save_map, voc_palette)


def test_map_round_trip_float16_and_clipped(tmp_path):
    cam = np.random.default_rng(0).random((2, 5, 7)).astype(np.float32)
    cam[0, 0, 0] = 1.5
    save_map(tmp_path / "a.npy", [3, 11], cam)
    keys, back = load_map(tmp_path / "a.npy")
    assert keys.tolist() == [3, 11]
    assert back.dtype == np.float32 and back.shape == (2, 5, 7)
    assert back[0, 0, 0] == 1.0
    np.testing.assert_allclose(back, np.clip(cam, 0, 1), atol=1e-3)
    raw = np.load(tmp_path / "a.npy", allow_pickle=True).item()
    assert raw["cam"].dtype == np.float16


def test_mctformer_dict_is_read_and_exported(tmp_path):
    maps = {4: np.full((3, 4), 0.25, np.float32), 1: np.zeros((3, 4), np.float32)}
    np.save(tmp_path / "m.npy", maps)
    keys, cam = load_map(tmp_path / "m.npy")
    assert keys.tolist() == [1, 4] and cam[1, 0, 0] == 0.25
    save_map(tmp_path / "x.npy", [2], np.ones((1, 3, 4)))
    export_mctformer_map(tmp_path / "x.npy", tmp_path / "y.npy")
    exported = np.load(tmp_path / "y.npy", allow_pickle=True).item()
    assert list(exported) == [2] and exported[2].shape == (3, 4)


def test_bad_map_files_name_the_file(tmp_path):
    with pytest.raises(MapFileError, match="missing.npy"):
        load_map(tmp_path / "missing.npy")
    (tmp_path / "trunc.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(MapFileError, match="trunc.npy"):
        load_map(tmp_path / "trunc.npy")
    np.save(tmp_path / "arr.npy", np.zeros((2, 3, 3)))
    with pytest.raises(MapFileError, match="arr.npy"):
        load_map(tmp_path / "arr.npy")


def test_atomic_open_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_open(target) as handle:
            handle.write(b"partial")
            raise RuntimeError("killed")
    assert not target.exists()
    assert os.listdir(tmp_path) == []
    atomic_write_json(target, {"a": np.float32(1.5)})
    assert target.read_text().strip().startswith("{")


_WRITE_UNDER_UMASK = """
import json, os, stat, sys
from pathlib import Path
os.umask(int(sys.argv[2], 8))
from mmcst import io
out = Path(sys.argv[1])
io.atomic_write_bytes(out / "new.bin", b"x")
io.atomic_write_json(out / "sub" / "new.json", {"a": 1})
io.save_map(out / "map.npy", [0], [[[0.5]]])
for name, mode in (("shared.txt", 0o640), ("private.txt", 0o600)):
    (out / name).write_text("old")
    os.chmod(out / name, mode)
    io.atomic_write_text(out / name, "new")
modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
print(json.dumps({"modes": modes, "umask": io.current_umask(), "at_import": io._UMASK_AT_IMPORT}))
"""


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_get_the_mode_plain_open_gives(tmp_path, umask):
    """New files get 0o666 & ~umask (not mkstemp's 0o600); overwritten files keep their mode."""
    result = subprocess.run([sys.executable, "-c", _WRITE_UNDER_UMASK, str(tmp_path), oct(umask)],
                            capture_output=True, text=True, check=True)
    written = json.loads(result.stdout)
    fresh = 0o666 & ~umask
    assert written["modes"] == {"new.bin": fresh, "new.json": fresh, "map.npy": fresh,
                                "shared.txt": 0o640, "private.txt": 0o600}
    assert written["umask"] == written["at_import"] == umask


def test_palette_png_round_trip(tmp_path):
    label = np.array([[0, 1, 20], [255, 3, 0]], np.uint8)
    save_label_png(tmp_path / "l.png", label)
    with Image.open(tmp_path / "l.png") as image:
        assert image.mode == "P"
        assert image.getpalette()[:6] == [0, 0, 0, 128, 0, 0]  # VOC background black, aeroplane dark red
    assert (load_label_png(tmp_path / "l.png") == label).all()
    pal = voc_palette()
    assert pal[255 * 3: 255 * 3 + 3] == [224, 224, 192]  # the VOC boundary colour
