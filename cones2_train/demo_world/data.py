"""Training data for the demo model: world scenes as pixels, caption tokens, and cached VAE latents.

`CaptionTable` holds, for scenes 0..N-1 of a seed, the 77 caption token ids and per object (up to
four) the kind word's token position, the normalised box, the named colour and the pattern; it
needs no rendering. `encode_latents` renders the same scenes once and keeps the VAE posterior
(mean, std) of each, so the UNet stage never runs the VAE encoder again.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from cones2.tokens import SEQ_LEN, locate_subject, prompt_token_ids

from .world import BACKGROUNDS, COLOURS, PATTERNS, Scene, WorldConfig, make_scene

MAX_OBJECTS = 4
COLOUR_LIST = list(COLOURS)


@dataclass
class CaptionTable:
    """token_ids (N, 77) int64; positions (N, 4) int64 (0 = no object); boxes (N, 4, 4) float32;
    colour (N, 4) int64 (index into COLOURS, -1 = not named or no object); pattern (N, 4) int64;
    second (N, 4) int64 (a patterned object's second colour when the caption names it, else -1;
    None in tables cached before world v2)."""

    token_ids: torch.Tensor
    positions: torch.Tensor
    boxes: torch.Tensor
    colour: torch.Tensor
    pattern: torch.Tensor
    second: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.token_ids.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"token_ids": self.token_ids, "positions": self.positions, "boxes": self.boxes,
               "colour": self.colour, "pattern": self.pattern}
        return out if self.second is None else {**out, "second": self.second}


def scenes(seed: int, count: int, start: int = 0, config: WorldConfig = WorldConfig()) -> list[Scene]:
    return [make_scene(seed, i, config) for i in range(start, start + count)]


def caption_table(tokenizer, scene_list: list[Scene]) -> CaptionTable:
    n = len(scene_list)
    ids = torch.zeros(n, SEQ_LEN, dtype=torch.int64)
    positions = torch.zeros(n, MAX_OBJECTS, dtype=torch.int64)
    boxes = torch.zeros(n, MAX_OBJECTS, 4, dtype=torch.float32)
    colour = torch.full((n, MAX_OBJECTS), -1, dtype=torch.int64)
    pattern = torch.zeros(n, MAX_OBJECTS, dtype=torch.int64)
    second = torch.full((n, MAX_OBJECTS), -1, dtype=torch.int64)
    for i, scene in enumerate(scene_list):
        tokens = prompt_token_ids(tokenizer, scene.caption)
        ids[i] = torch.tensor(tokens)
        for j, obj in enumerate(scene.objects):
            positions[i, j] = locate_subject(tokenizer, tokens, obj.kind).word_positions[0]
            boxes[i, j] = torch.tensor(obj.box, dtype=torch.float32) / scene.size
            colour[i, j] = COLOUR_LIST.index(obj.colour) if scene.named_colours[j] else -1
            pattern[i, j] = PATTERNS.index(obj.pattern)
            if scene.named_seconds and scene.named_seconds[j]:
                second[i, j] = COLOUR_LIST.index(obj.second)
    return CaptionTable(ids, positions, boxes, colour, pattern, second)


def empty_caption_ids(tokenizer) -> torch.Tensor:
    """(77,) token ids of "" (the unconditional prompt of classifier-free guidance)."""
    return torch.tensor(prompt_token_ids(tokenizer, ""), dtype=torch.int64)


def to_pixels(images) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) float32 in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def object_weights(scene_list: list[Scene], pixels: torch.Tensor, object_weight: float) -> torch.Tensor:
    """(B, 1, H, W): 1 on the background, 1 + object_weight where a pixel differs from it
    (objects are small, so plain L1 would mostly teach the VAE flat backgrounds)."""
    bg = torch.tensor([BACKGROUNDS[s.background] for s in scene_list], dtype=torch.float32) / 127.5 - 1.0
    differs = (pixels - bg[:, :, None, None]).abs().amax(dim=1, keepdim=True) > 1e-3
    return 1.0 + object_weight * differs.float()


@torch.no_grad()
def encode_latents(vae, seed: int, count: int, batch: int = 256, progress: bool = True,
                   config: WorldConfig = WorldConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """Render scenes 0..count-1 of `seed` and encode them: posterior (mean, std), each (N, C, h, w)."""
    means, stds = [], []
    for start in tqdm(range(0, count, batch), desc="encode dataset", unit="batch", disable=not progress):
        chunk = scenes(seed, min(batch, count - start), start, config)
        post = vae.encode(to_pixels([s.render() for s in chunk])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)
