"""Short training runs on the tiny model (SPEC 1): what is frozen stays frozen, the regulariser holds
the non-subject tokens, the residual is SPEC 1.5 of the tuned encoder, the engine uses it, and a
run interrupted with Ctrl-C and resumed ends exactly where an uninterrupted run does."""
from __future__ import annotations

import hashlib
import os
import signal

import pytest
import torch
from PIL import Image, ImageDraw

import cones2
from cones2.loading import load_components
from cones2_train import TrainConfig, Trainer, TrainingInterrupted, train_residual


def _images(n: int = 3) -> list[Image.Image]:
    out = []
    for i in range(n):
        im = Image.new("RGB", (72 + 8 * i, 64), (40 * i, 110, 190))
        ImageDraw.Draw(im).ellipse((8 + 4 * i, 8, 48, 56), fill=(210, 90, 40))
        out.append(im)
    return out


def _hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def components(tiny_model_dir):
    return load_components(tiny_model_dir, torch.device("cpu"), torch.float32)


def test_only_the_text_encoder_copy_trains(components):
    before = {name: _hash(getattr(components, name)) for name in ("unet", "vae", "text_encoder")}
    trainer = Trainer(components, _images(), "dog", TrainConfig(steps=3, lr=1e-3, resolution=64))
    tuned_before = _hash(trainer.tuned)
    trainer.train(progress=False)
    after = {name: _hash(getattr(components, name)) for name in ("unet", "vae", "text_encoder")}
    assert after == before                                  # UNet, VAE and the original encoder untouched
    assert _hash(trainer.tuned) != tuned_before            # the copy changed
    assert all(p.grad is None for m in (components.unet, components.vae) for p in m.parameters())
    assert not any(p.requires_grad for m in (components.unet, components.vae) for p in m.parameters())
    tuned_ids = {id(p) for p in trainer.tuned.parameters()}
    opt_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert opt_ids == tuned_ids                             # all of E', and only E', has optimizer state


def _token_drift(components, reg: float, steps: int = 100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train "teddy bear" (k = 2) and return per-token ||E'(s) - E0(s)|| of the held rows (start token,
    end token + padding), of the free rows 1..2, and the mean norm of E0(s)."""
    # lr much larger than the recipe's so that 100 tiny steps move things visibly
    cfg = TrainConfig(steps=steps, lr=3e-3, resolution=64, reg_first=reg, reg_rest=reg, seed=1)
    trainer = Trainer(components, _images(), "teddy bear", cfg)
    trainer.train(progress=False)
    ids = torch.tensor([components.tokenizer("teddy bear", padding="max_length", max_length=77).input_ids])
    with torch.no_grad():
        tuned, frozen = trainer.tuned(ids)[0][0], components.text_encoder(ids)[0][0]
    dist = (tuned - frozen).norm(dim=-1)                    # (77,)
    return torch.cat([dist[:1], dist[3:]]), dist[1:3], frozen.norm(dim=-1).mean()


def test_huge_regulariser_holds_start_and_tail_tokens(components):
    held, free, scale = _token_drift(components, 1e4)
    assert held.max() < 0.1 * scale, (held.max(), scale)    # held rows stay at E0 (within 10% of a row's norm)
    assert free.min() > 3 * held.max(), (free, held.max())  # while the subject's rows move
    held_free_run, _, _ = _token_drift(components, 0.0, steps=30)   # control: without it the held rows drift away
    assert held_free_run.max() > 10 * held.max(), (held_free_run.max(), held.max())


def test_residual_is_spec_1_5_of_the_saved_tuned_encoder(tiny_model_dir, tmp_path):
    from importlib import resources

    from transformers import CLIPTextModel, CLIPTokenizer

    from cones2_train.cli import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(_images()):
        im.save(folder / f"{i}.png")
    out, enc_dir = tmp_path / "bear.safetensors", tmp_path / "encoder"
    rc = main(["--model", str(tiny_model_dir), "--images", str(folder), "--word", "teddy bear", "--out", str(out),
               "--steps", "4", "--lr", "1e-3", "--resolution", "64", "--save-encoder", str(enc_dir), "--no-progress"])
    assert rc == 0
    residual = cones2.Residual.load(out)

    # Independent SPEC 1.5: read the shipped templates, tokenize, find the word, mean of tuned - frozen.
    text = resources.files("cones2_train").joinpath("data/templates.txt").read_text()
    templates = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    tok = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    tuned = CLIPTextModel.from_pretrained(enc_dir).eval()
    frozen = CLIPTextModel.from_pretrained(tiny_model_dir / "text_encoder").eval()
    word = tok("teddy bear", add_special_tokens=False).input_ids
    rows = []
    for t in templates:
        ids = tok(t.format("teddy bear"), padding="max_length", max_length=77).input_ids
        start = next(i for i in range(1, 77) if ids[i : i + len(word)] == word)
        with torch.no_grad():
            x = torch.tensor([ids])
            rows.append((tuned(x)[0][0] - frozen(x)[0][0])[start : start + len(word)])
    want = torch.stack(rows).mean(0)
    assert residual.embedding.shape == (2, 32)
    assert residual.word == "teddy bear" and list(residual.token_ids) == word
    assert residual.metadata["steps"] == "4" and residual.metadata["lr"] == "0.001"
    assert want.abs().max() > 1e-4                          # training moved something
    torch.testing.assert_close(residual.embedding, want, atol=1e-6, rtol=1e-5)


def test_engine_uses_the_residual_only_at_the_word(tiny_engine):
    probe = "a photo of a cat on a sofa"
    before = tiny_engine.encode([probe]).clone()
    te_hash = _hash(tiny_engine.text_encoder)
    residual = train_residual(tiny_engine, _images(), "dog", TrainConfig(steps=4, lr=1e-3, resolution=64),
                              progress=False)
    # Training through the engine's own components left what it computes without the residual intact.
    assert _hash(tiny_engine.text_encoder) == te_hash
    assert torch.equal(tiny_engine.encode([probe]), before)

    prompt = "a photo of a dog on the grass"
    kw = dict(steps=2, height=64, width=64, seed=0, progress=False)
    plain = tiny_engine.generate(prompt, **kw)
    dog = tiny_engine.generate(prompt, {"dog": residual}, **kw)
    pos = dog.subject_tokens[0].residual_starts[0]
    diff = dog.cond_embeddings[0] - plain.cond_embeddings[0]          # (77, D)
    others = torch.cat([diff[:pos], diff[pos + 1 :]])
    assert torch.equal(others, torch.zeros_like(others))               # every other token unchanged
    torch.testing.assert_close(diff[pos], residual.embedding[0], atol=1e-6, rtol=0)
    assert (dog.latents - plain.latents).abs().max() > 1e-4            # and the image changes


def test_ctrl_c_then_resume_matches_uninterrupted_run(components, tmp_path):
    base = dict(steps=6, lr=1e-3, resolution=64, batch_size=2, seed=3)
    full = Trainer(components, _images(), "dog", TrainConfig(**base, checkpoint_dir=str(tmp_path / "a"), save_every=2))
    want = full.train(progress=False)
    # periodic checkpoints at steps 2 and 4; keep_checkpoints=1 leaves the newest only
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["step-000004"]

    def ctrl_c_at_step_3(step, total, loss):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    first = Trainer(components, _images(), "dog", TrainConfig(**base, checkpoint_dir=str(tmp_path / "b")))
    with pytest.raises(TrainingInterrupted) as info:
        first.train(progress=False, on_step=ctrl_c_at_step_3)
    assert info.value.step == 3 and info.value.checkpoint.name == "step-000003"

    for ckpt in (info.value.checkpoint, tmp_path / "a"):   # the Ctrl-C one, and the periodic one (step 4)
        resumed = Trainer(components, _images(), "dog", TrainConfig(**base, resume=str(ckpt)))
        got = resumed.train(progress=False)
        assert resumed.step == 6
        assert torch.equal(got.embedding, want.embedding)
        for (n1, a), (n2, b) in zip(full.tuned.state_dict().items(), resumed.tuned.state_dict().items()):
            assert n1 == n2 and torch.equal(a, b), n1


def test_resume_refuses_a_different_run(components, tmp_path):
    cfg = TrainConfig(steps=2, resolution=64, checkpoint_dir=str(tmp_path), save_every=1)
    Trainer(components, _images(), "dog", cfg).train(progress=False)
    with pytest.raises(cones2.Cones2Error, match="resume: checkpoint was made with lr="):
        Trainer(components, _images(), "dog", TrainConfig(steps=4, lr=1e-4, resolution=64, resume=str(tmp_path)))
    with pytest.raises(cones2.Cones2Error, match="images_sha256"):
        Trainer(components, _images(2), "dog", TrainConfig(steps=4, resolution=64, resume=str(tmp_path)))


def test_train_prompt_puts_the_word_in_context_and_holds_what_follows(components):
    """TrainConfig.train_prompt (opt-in, off SPEC 1.2): the loss conditions on "a photo of teddy bear";
    the start token and everything after the word are held, the context before it is free."""
    cfg = TrainConfig(steps=100, lr=3e-3, resolution=64, reg_first=1e4, reg_rest=1e4, seed=1,
                      train_prompt="a photo of {}")
    trainer = Trainer(components, _images(), "teddy bear", cfg)
    ids = components.tokenizer("a photo of teddy bear", padding="max_length", max_length=77).input_ids
    assert trainer.prompt_ids[0].tolist() == ids and trainer.free_tokens == 5   # "a photo of" + 2 word tokens
    residual = trainer.train(progress=False)
    assert residual.metadata["train_prompt"] == "a photo of {}" and residual.rows == 2
    with torch.no_grad():
        dist = (trainer.tuned(torch.tensor([ids]))[0][0] - components.text_encoder(torch.tensor([ids]))[0][0]).norm(dim=-1)
    held, free = torch.cat([dist[:1], dist[6:]]), dist[4:6]
    assert free.min() > 3 * held.max(), (free, held.max())


@pytest.mark.parametrize("prompt", ["a photo", "{} and {}", ""])
def test_train_prompt_needs_exactly_one_slot(prompt):
    with pytest.raises(cones2.Cones2Error, match="^train_prompt: must be a caption with exactly one {}"):
        TrainConfig(train_prompt=prompt)
