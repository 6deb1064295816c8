"""Subject token positions (SPEC 2) and layout weight maps (SPEC 3) against tests/spec_reference.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import cones2
import spec_reference as spec
from cones2.tokens import locate_subject, prompt_token_ids


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")


@pytest.mark.parametrize("prompt,word", [
    ("a dog and a teddybear", "teddybear"),          # multi-token word
    ("a dog chasing another dog", "dog"),             # repeated word
    ("a teddybear hugging a teddybear", "teddybear"),  # repeated multi-token word
    ("a sunflower", "sunflower"),
])
def test_positions_match_reference(tokenizer, prompt, word):
    ids = prompt_token_ids(tokenizer, prompt)
    found = locate_subject(tokenizer, ids, word)
    assert sorted(found.word_positions) == spec.subject_token_positions(tokenizer, prompt, word)
    assert list(found.residual_starts) == spec.subject_occurrences(tokenizer, prompt, word)


def test_multi_token_word_positions(tokenizer):
    found = locate_subject(tokenizer, prompt_token_ids(tokenizer, "a teddybear"), "teddybear")
    assert len(found.token_ids) == 2 and found.word_positions == (2, 3) and found.residual_starts == (2,)


def test_missing_subject_is_named(tokenizer):
    with pytest.raises(cones2.Cones2Error, match="'cat' does not occur"):
        locate_subject(tokenizer, prompt_token_ids(tokenizer, "a dog"), "cat")


def test_subject_past_the_cut_off_is_named(tokenizer):
    """A word the 77-token window drops is not "missing": the message says where it went."""
    words = ["a"] * 80 + ["teddybear"]                  # 'teddybear' starts at token 81 (token 0 is the start)
    prompt = " ".join(words)
    ids = prompt_token_ids(tokenizer, prompt)
    with pytest.raises(cones2.Cones2Error) as info:
        locate_subject(tokenizer, ids, "teddybear", prompt=prompt)
    assert str(info.value) == ("subjects.teddybear: subject 'teddybear' lies past the prompt's 77-token limit (it "
                               "starts at token 81; the text encoder reads tokens 1..75 only): move it earlier or "
                               "shorten the prompt")
    found = locate_subject(tokenizer, ids, "a", prompt=prompt)          # the words inside the window are found
    assert found.word_positions == tuple(range(1, 76))


def test_explicit_positions_are_bounded(tokenizer):
    ids = prompt_token_ids(tokenizer, "a dog")
    with pytest.raises(cones2.Cones2Error) as info:
        locate_subject(tokenizer, ids, "dog", explicit=list(range(1, 10_000)))
    assert str(info.value) == "subjects.dog.positions: needs 1 to 75 token positions, got 9999"


def test_padding_never_matches(tokenizer):
    """SD 2.x pads with "!" (token 0): the word "!" must not match the padding."""
    with pytest.raises(cones2.Cones2Error):
        locate_subject(tokenizer, prompt_token_ids(tokenizer, "a dog"), "!")


def test_explicit_positions_override(tokenizer):
    found = locate_subject(tokenizer, prompt_token_ids(tokenizer, "a dog and a dog"), "dog", explicit=[5])
    assert found.residual_starts == (5,) and found.word_positions == (2, 5)
    with pytest.raises(cones2.Cones2Error, match="positions"):
        locate_subject(tokenizer, prompt_token_ids(tokenizer, "a dog"), "dog", explicit=[0])


@pytest.mark.parametrize("height,width", [(128, 128), (192, 128), (64, 256)])
def test_weight_maps_match_reference(tokenizer, height, width):
    prompt = "a dog and a teddybear next to a dog"
    boxes = {"dog": (0.1, 0.2, 0.45, 0.9), "teddybear": (0.5, 0.05, 0.97, 0.6)}
    strengths = {"dog": 2.5, "teddybear": 1.75}
    layout = cones2.Layout.from_boxes(boxes, strengths)
    masks = layout.masks(height, width)
    levels = [(height // 8 >> i, width // 8 >> i) for i in range(3)]
    ids = prompt_token_ids(tokenizer, prompt)
    positions = {w: locate_subject(tokenizer, ids, w).word_positions for w in boxes}
    ours = layout.weight_maps(positions, height, width, levels, -1e8)
    ref = spec.weight_maps(tokenizer, prompt, {w: (masks[w], strengths[w]) for w in boxes}, -1e8, height, width, levels)
    for (h, w), expected in ref.items():
        torch.testing.assert_close(ours[h * w], expected, rtol=0, atol=0)


def _sample_at_cell_centres(full: np.ndarray, h: int, w: int) -> np.ndarray:
    """Reference for layout_resize="cell-centres", written out in numpy: cell (i, j) of an h x w level
    takes the bilinear value of the full map at the centre of the pixels it covers,
    y = (i + 0.5) * H / h - 0.5 (clamped to the image), and likewise x."""
    H, W = full.shape
    out = np.empty((h, w), np.float64)
    for i in range(h):
        y = min(max((i + 0.5) * H / h - 0.5, 0.0), H - 1.0)
        y0 = int(np.floor(y)); y1 = min(y0 + 1, H - 1); fy = y - y0
        for j in range(w):
            x = min(max((j + 0.5) * W / w - 0.5, 0.0), W - 1.0)
            x0 = int(np.floor(x)); x1 = min(x0 + 1, W - 1); fx = x - x0
            top = full[y0, x0] * (1 - fx) + full[y0, x1] * fx
            bottom = full[y1, x0] * (1 - fx) + full[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


@pytest.mark.parametrize("height,width", [(64, 64), (192, 128)])
def test_cell_centres_maps_sample_each_cell_at_its_centre(tokenizer, height, width):
    boxes = {"dog": (0.1, 0.2, 0.45, 0.9), "teddybear": (0.5, 0.05, 0.97, 0.6)}
    strengths = {"dog": 2.5, "teddybear": 1.75}
    layout = cones2.Layout.from_boxes(boxes, strengths)
    masks = layout.masks(height, width)
    levels = [(height // 8 >> i, width // 8 >> i) for i in range(3)]
    positions = {"dog": [2, 9], "teddybear": [5]}
    ours = layout.weight_maps(positions, height, width, levels, -1e8, resize="cell-centres")
    for h, w in levels:
        for word, cols in positions.items():
            full = np.where(masks[word].numpy(), strengths[word], -1e8)
            expected = _sample_at_cell_centres(full, h, w).reshape(-1)
            for c in cols:
                np.testing.assert_allclose(ours[h * w][:, c].double().numpy(), expected, rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("seed", range(6))
def test_cell_centres_differs_from_the_spec_rule_only_at_region_edges(seed):
    """The deviation bound of the opt-in rule: a level cell is masked differently from SPEC 3's
    aligned-corners rule only if its pixels lie within one cell of the region's edge, and the
    rules agree on every cell deep inside or far outside."""
    rng = np.random.default_rng(seed)
    x0, y0 = rng.uniform(0, 0.6, 2)
    box = (x0, y0, x0 + rng.uniform(0.15, 0.4), y0 + rng.uniform(0.15, 0.4))
    layout = cones2.Layout.from_boxes({"dog": box})
    size = 128
    for h in (16, 8, 4):
        spec_rule = layout.weight_maps({"dog": [2]}, size, size, [(h, h)], -1e8)[h * h][:, 2] > -1e4
        centres = layout.weight_maps({"dog": [2]}, size, size, [(h, h)], -1e8, resize="cell-centres")[h * h][:, 2] > -1e4
        cell = size / h
        ij = np.stack(np.meshgrid(np.arange(h), np.arange(h), indexing="ij"), -1).reshape(-1, 2)
        lo, hi = ij * cell, (ij + 1) * cell                        # each cell's pixel span (rows, cols)
        bx0, by0, bx1, by1 = (v * size for v in box)
        near_edge = np.zeros(len(ij), bool)
        for edge_lo, edge_hi, axis in ((by0, by1, 0), (bx0, bx1, 1)):
            for e in (edge_lo, edge_hi):
                near_edge |= (lo[:, axis] - cell <= e) & (e <= hi[:, axis] + cell)
        differs = (spec_rule != centres).numpy()
        assert not (differs & ~near_edge).any(), f"level {h}: cells away from the box edge changed"
        deep = ((lo[:, 0] >= by0 + cell) & (hi[:, 0] <= by1 - cell) & (lo[:, 1] >= bx0 + cell) & (hi[:, 1] <= bx1 - cell))
        assert centres.numpy()[deep].all() and spec_rule.numpy()[deep].all()


def test_unknown_layout_resize_is_named():
    with pytest.raises(cones2.Cones2Error, match="layout_resize"):
        cones2.Layout.from_boxes({"dog": (0, 0, 1, 1)}).weight_maps({"dog": [2]}, 64, 64, [(8, 8)], -1e8, resize="area")
    with pytest.raises(cones2.Cones2Error, match="layout_resize"):
        cones2.SamplingConfig(layout_resize="nearest")


def test_box_rasterisation():
    m = cones2.Layout.from_boxes({"a": (0.25, 0.5, 0.75, 1.0)}).masks(64, 128)["a"]
    assert m.shape == (64, 128) and m.sum() == 32 * 64
    assert m[32:, 32:96].all() and not m[:32].any() and not m[:, :32].any()
    px = cones2.Layout.from_boxes({"a": (32, 32, 96, 64)}, units="pixels").masks(64, 128)["a"]
    assert torch.equal(m, px)


def test_boxes_masks_and_colour_map_agree(tmp_path):
    from PIL import Image

    H, W = 64, 128
    boxes = {"dog": (0.0, 0.25, 0.5, 1.0), "mug": (0.5, 0.0, 1.0, 0.5)}
    from_boxes = cones2.Layout.from_boxes(boxes, {"dog": 2.5, "mug": 3.0})
    masks = from_boxes.masks(H, W)
    from_masks = cones2.Layout.from_masks({k: v.numpy() for k, v in masks.items()}, {"dog": 2.5, "mug": 3.0})
    img = np.zeros((H, W, 3), dtype=np.uint8)
    img[masks["dog"].numpy()] = (255, 0, 0)
    img[masks["mug"].numpy()] = (255, 192, 0)
    Image.fromarray(img).save(tmp_path / "layout.png")
    from_colors = cones2.Layout.from_color_map(tmp_path / "layout.png", {"255,0,0": ["dog", 2.5], "#ffc000": ("mug", 3.0)})
    positions = {"dog": [2], "mug": [5]}
    levels = [(8, 16), (4, 8)]
    ref = from_boxes.weight_maps(positions, H, W, levels, -1e8)
    for other in (from_masks, from_colors):
        got = other.weight_maps(positions, H, W, levels, -1e8)
        for n in ref:
            assert torch.equal(ref[n], got[n])


def test_hard_mask_boundary_values():
    """Blends at region boundaries stay far below the -1e4 hard-mask threshold (SPEC 3)."""
    layout = cones2.Layout.from_boxes({"dog": (0.3, 0.3, 0.7, 0.7)})
    maps = layout.weight_maps({"dog": [2]}, 128, 128, [(16, 16), (4, 4)], -1e8)
    col = maps[16 * 16][:, 2]
    inside = (col - 2.5).abs() < 1e-5
    assert inside.any() and col.min() <= -0.999e8
    assert (inside | (col <= -1e4)).all(), "a blend landed between w+ and the hard-mask threshold"
    assert maps[256][:, [0, 1, 3]].abs().sum() == 0


@pytest.mark.parametrize("boxes,msg", [
    ({"dog": (0.5, 0.1, 0.2, 0.9)}, "inverted"),
    ({"dog": (0.0, 0.0, 1.2, 1.0)}, r"\[0, 1\]"),
    ({"dog": (0.0, 0.0, float("nan"), 1.0)}, "finite"),
    ({"dog": (0.0, 0.0, 1.0)}, "4 finite numbers"),
])
def test_bad_boxes_name_the_field(boxes, msg):
    with pytest.raises(cones2.Cones2Error, match=msg) as info:
        cones2.Layout.from_boxes(boxes)
    assert info.value.field == "layout.boxes.dog"


def test_colour_missing_from_image_is_an_error(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / "l.png")
    with pytest.raises(cones2.Cones2Error, match="does not occur"):
        cones2.Layout.from_color_map(tmp_path / "l.png", {"255,0,0": ["dog", 2.5]})
    with pytest.raises(cones2.Cones2Error, match="colour must be"):
        cones2.Layout.from_color_map(tmp_path / "l.png", {"300,0,0": ["dog", 2.5]})
