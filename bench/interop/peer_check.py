"""What both peer-side check scripts share (they run inside the peers' venvs, never in tc's)."""
from __future__ import annotations

import argparse

import numpy as np
import torch


def compare(tc_side: np.ndarray, peer: torch.Tensor) -> float:
    """Largest absolute difference between tc's values and the peer tool's."""
    return float(np.abs(peer.detach().double().numpy() - tc_side.astype(np.float64)).max())


def arguments(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--export", required=True)
    p.add_argument("--rows", required=True)
    return p.parse_args()
