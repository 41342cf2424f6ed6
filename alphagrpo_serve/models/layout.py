"""Turns segment lists (models/tasks.py) into the batched tensors TinyUMM reads, the same way for
training and for inference: tokens, kinds, positions, attention blocks, validity, text labels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .tiny_umm import KIND_CLEAN, KIND_NOISY, KIND_TEXT, patchify


def to_unit(img: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [-1, 1]."""
    img = np.ascontiguousarray(img)
    if not img.flags.writeable:  # e.g. decoded from a request's bytes: torch would warn about sharing it
        img = img.copy()
    return torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, L] long (pad id at image slots and padding)
    kinds: torch.Tensor  # [B, L] KIND_* (-1 padding)
    positions: torch.Tensor  # [B, L]
    blocks: torch.Tensor  # [B, L] attention blocks
    valid: torch.Tensor  # [B, L] bool
    labels: torch.Tensor  # [B, L] target token at each position (-100 where none)
    clean: torch.Tensor  # [B, n_patches, patch_dim] input image patches (zeros where a row has none)
    target: torch.Tensor  # [B, 3, H, W] image to draw (zeros where none)
    has_gen: torch.Tensor  # [B] bool


def collate(segment_lists: Sequence[list], pad_id: int, patch: int, canvas: int, left_pad: bool = False) -> Batch:
    """Segment lists -> Batch. Right padding for training; left padding (left_pad) for generation,
    so every row's last position is its newest token."""
    n_patches = (canvas // patch) ** 2
    rows = []
    for segs in segment_lists:
        toks, kinds, labels, blocks = [], [], [], []
        clean, target = None, None
        for seg in segs:
            if seg[0] == "text":
                for tid in seg[1]:
                    blocks.append(len(toks))
                    toks.append(tid)
                    kinds.append(KIND_TEXT)
                    labels.append(tid if seg[2] else -100)
            else:
                start = len(toks)
                last = start + n_patches - 1
                for _ in range(n_patches):
                    blocks.append(last)
                    toks.append(pad_id)
                    kinds.append(KIND_CLEAN if seg[0] == "image" else KIND_NOISY)
                    labels.append(-100)
                if seg[0] == "image":
                    clean = to_unit(seg[1])
                else:
                    target = to_unit(seg[1]) if seg[1] is not None else torch.zeros(3, canvas, canvas)
        rows.append((toks, kinds, labels, blocks, clean, target))
    B = len(rows)
    L = max(len(r[0]) for r in rows)
    big = 1 << 30
    tokens = torch.full((B, L), pad_id, dtype=torch.long)
    kinds = torch.full((B, L), -1, dtype=torch.long)
    positions = torch.zeros((B, L), dtype=torch.long)
    blocks = torch.full((B, L), big, dtype=torch.long)
    valid = torch.zeros((B, L), dtype=torch.bool)
    labels = torch.full((B, L), -100, dtype=torch.long)
    clean = torch.zeros(B, n_patches, 3 * patch * patch)
    target = torch.zeros(B, 3, canvas, canvas)
    has_gen = torch.zeros(B, dtype=torch.bool)
    for i, (toks, kd, lb, bl, cl, tg) in enumerate(rows):
        n = len(toks)
        off = L - n if left_pad else 0
        sl = slice(off, off + n)
        tokens[i, sl] = torch.tensor(toks)
        kinds[i, sl] = torch.tensor(kd)
        labels[i, sl] = torch.tensor(lb)
        blocks[i, sl] = torch.tensor(bl) + off
        positions[i, sl] = torch.arange(n)
        valid[i, sl] = True
        if cl is not None:
            clean[i] = patchify(cl[None], patch)[0]
        if tg is not None:
            target[i] = tg
            has_gen[i] = True
    return Batch(tokens, kinds, positions, blocks, valid, labels, clean, target, has_gen)
