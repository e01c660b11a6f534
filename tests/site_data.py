"""Sites' own data as real sites hold it, written by the tests: CSV files and image folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_csv(path: Path, x: np.ndarray, y: np.ndarray, label_column: str = "label") -> Path:
    """One header row (f0, f1 ... and the label column), then one example per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        handle.write(",".join([f"f{i}" for i in range(x.shape[1])] + [label_column]) + "\n")
        for row, label in zip(x, y):
            handle.write(",".join(f"{v:.6g}" for v in row) + f",{int(label)}\n")
    return path


def write_image_folder(directory: Path, x: np.ndarray, y: np.ndarray, *, side: int = 8, rgb: bool = False,
                       class_folder=str) -> Path:
    """Digits (64 features in [0, 1]) as PNG files, one subfolder per class (named by ``class_folder``),
    each image ``side`` pixels square (enlarged by repeating pixels), grayscale or RGB."""
    from PIL import Image

    for index, (features, label) in enumerate(zip(x, y)):
        pixels = np.rint(features.reshape(8, 8) * 255).astype(np.uint8)
        pixels = np.kron(pixels, np.ones((side // 8, side // 8), np.uint8)) if side != 8 else pixels
        if rgb:
            pixels = np.repeat(pixels[:, :, None], 3, axis=2)
        folder = directory / class_folder(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{index:05d}.png")
    for path in (directory, *directory.rglob("*")):  # readable by the containers' user (uid 10001)
        path.chmod(0o755 if path.is_dir() else 0o644)
    return directory
