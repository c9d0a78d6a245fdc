"""A small synthetic audio-visual dataset in the reference layout, for training tests.

Every class fixes a tone (pitch and on/off rhythm) in the audio and a coloured shape in the
frames. Within a class, one per-clip variable ``u`` in [0, 1) moves both the pitch (a little)
and the shape's size, so audio and frames are paired per clip, not only per class. Files are
written directly (16 kHz PCM WAV, 224 x 224 JPEGs), without video encoding, so a dataset of a
hundred clips takes about a second.
"""

from __future__ import annotations

import json
import wave
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

SAMPLE_RATE = 16000
NUM_FRAMES = 10

# 8 well separated colours (RGB)
PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
    (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230),
]


@dataclass
class SyntheticDataset:
    root: Path
    label_csv: Path
    splits: dict[str, Path]  # split name -> dataset JSON
    weight_csv: Path  # for the "train" split
    num_classes: int


def _audio(cls: int, u: float, seconds: float, rng: np.random.Generator) -> np.ndarray:
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    f0 = 300.0 * 1.4**cls * (1.0 + 0.3 * (u - 0.5))
    rate = 2.0 + cls % 4  # on/off rhythm in Hz
    envelope = (np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi)) > -0.2).astype(np.float64)
    x = np.sin(2 * np.pi * f0 * t) + 0.4 * np.sin(2 * np.pi * 2 * f0 * t + 1.0)
    x = rng.uniform(0.2, 0.4) * envelope * x + 0.01 * rng.standard_normal(n)
    return x.astype(np.float32)


def _frame(cls: int, u: float, i: int, base: tuple[int, int], shade: int, rng: np.random.Generator) -> np.ndarray:
    img = np.full((224, 224, 3), shade, dtype=np.uint8)
    size = int(20 + 60 * u)
    cx = int(np.clip(base[0] + 4 * i, size, 224 - size))
    cy = int(np.clip(base[1], size, 224 - size))
    colour = PALETTE[cls % len(PALETTE)]
    if cls % 2 == 0:
        cv2.circle(img, (cx, cy), size, colour, thickness=-1)
    else:
        cv2.rectangle(img, (cx - size, cy - size), (cx + size, cy + size), colour, thickness=-1)
    noise = rng.integers(-8, 9, img.shape)
    return np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def _write_wav(path: Path, x: np.ndarray) -> None:
    pcm = np.clip(np.round(x * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())


def make_synthetic_dataset(
    root: str | Path,
    *,
    num_classes: int = 8,
    splits: dict[str, int] | None = None,
    seconds: float = 2.0,
    seed: int = 0,
) -> SyntheticDataset:
    """Write the dataset under ``root``; ``splits`` maps split name -> clips per class."""
    root = Path(root)
    splits = splits or {"train": 10, "val": 4}
    rng = np.random.default_rng(seed)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    for i in range(NUM_FRAMES):
        (root / "frames" / f"frame_{i}").mkdir(parents=True, exist_ok=True)
    label_csv = root / "labels.csv"
    with open(label_csv, "w") as f:
        f.write("index,mid,display_name\n")
        for c in range(num_classes):
            f.write(f'{c},/m/c{c},"class {c}, synthetic"\n')
    out: dict[str, Path] = {}
    for split, per_class in splits.items():
        entries = []
        for k in range(per_class):
            for c in range(num_classes):
                vid = f"{split}_{c}_{k}"
                u = float(rng.random())
                _write_wav(root / "audio" / f"{vid}.wav", _audio(c, u, seconds, rng))
                base = (int(rng.integers(60, 110)), int(rng.integers(70, 150)))
                shade = int(rng.integers(90, 170))
                for i in range(NUM_FRAMES):
                    rgb = _frame(c, u, i, base, shade, rng)
                    cv2.imwrite(
                        str(root / "frames" / f"frame_{i}" / f"{vid}.jpg"),
                        cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, 90],
                    )
                entries.append(
                    {
                        "video_id": vid,
                        "wav": str(root / "audio" / f"{vid}.wav"),
                        "video_path": str(root / "frames"),
                        "labels": f"/m/c{c}",
                    }
                )
        path = root / f"{split}.json"
        path.write_text(json.dumps({"data": entries}))
        out[split] = path
    weight_csv = root / "train_weight.csv"
    first = next(iter(splits))
    n = splits[first] * num_classes
    weight_csv.write_text("".join(f"{1.0 + (i % 3)}\n" for i in range(n)))
    return SyntheticDataset(root, label_csv, out, weight_csv, num_classes)
