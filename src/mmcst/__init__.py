"""mmcst: weakly supervised dense object localization (MMCST, MCTformer, CAM)."""
from __future__ import annotations

__version__ = "0.1.0"
