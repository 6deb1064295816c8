"""Residual files: the project's safetensors form, the reference's .pt tensors, and validation."""
from __future__ import annotations

import pickle

import pytest
import torch

import cones2


def test_safetensors_round_trip(tmp_path):
    r = cones2.Residual(torch.randn(2, 32), word="teddybear", token_ids=(25758, 4298), base_model="tiny@abc",
                        metadata={"steps": "10"})
    path = r.save(tmp_path / "bear.safetensors")
    back = cones2.Residual.load(path)
    assert torch.equal(back.embedding, r.embedding)
    assert (back.word, back.token_ids, back.base_model, back.metadata["steps"]) == ("teddybear", (25758, 4298), "tiny@abc", "10")


def test_equal_residuals_serialise_to_equal_bytes(tmp_path):
    """The sha256 recorded in every image names the residual's content, so equal residuals must give
    equal bytes however often they are written and whatever order their metadata was given in
    (safetensors itself writes the header in a random order)."""
    embedding = torch.randn(2, 32)
    keys = [f"key{i}" for i in range(8)]
    a = cones2.Residual(embedding, word="dog", metadata={k: k.upper() for k in keys})
    b = cones2.Residual(embedding.clone(), word="dog", metadata={k: k.upper() for k in reversed(keys)})
    forms = {a.to_safetensors_bytes() for _ in range(10)} | {b.to_safetensors_bytes()}
    assert len(forms) == 1
    assert a.sha256 == b.sha256 == cones2.Residual.load(a.save(tmp_path / "dog.safetensors")).sha256
    back = cones2.Residual.from_safetensors_bytes(forms.pop())
    assert torch.equal(back.embedding, embedding) and back.metadata == a.metadata


def test_a_subject_is_about_5_kb_at_sd_2_width(tmp_path):
    """SPEC 5's "about 5 KB per subject" at the width it is about (SD 2.x, D = 1024), for a one-token
    word, with the metadata a training run writes (its keys and value lengths: cones2_train/trainer.py)."""
    sha = "0" * 64
    metadata = {"trainer": "cones2_train", "version": "0.0.0", "steps": "4000", "lr": "5e-06", "seed": "0",
                "batch_size": "1", "resolution": "768", "reg_first": "0.01", "reg_rest": "0.001", "train_prompt": "{}",
                "grad_clip": "1.0", "weight_decay": "0.01", "dtype": "bf16", "prediction_type": "v_prediction",
                "images": "5", "images_sha256": sha, "templates": "100", "templates_sha256": sha,
                "base_model_path": "/home/user/.cache/huggingface/hub/models--stabilityai--stable-diffusion-2-1",
                "text_encoder_sha256": sha}
    r = cones2.Residual(torch.randn(1, 1024), word="dog", token_ids=(1929,),
                        base_model="stabilityai/stable-diffusion-2-1@" + "f" * 40, metadata=metadata)
    size = r.save(tmp_path / "dog.safetensors").stat().st_size
    assert 1024 * 4 <= size <= 5 * 1024, f"{size} bytes"   # the fp32 (1, 1024) tensor, plus under 1 KiB of header


@pytest.mark.parametrize("shape", [(1, 32), (32,)])
def test_reference_pt_files(tmp_path, shape):
    t = torch.randn(*shape)
    torch.save(t, tmp_path / "dog.pt")
    r = cones2.Residual.load(tmp_path / "dog.pt")
    assert r.embedding.shape == (1, 32) and torch.equal(r.embedding[0], t.reshape(-1))


def test_pt_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(cones2.Cones2Error) as info:
        cones2.Residual.load(tmp_path / "evil.pt", "subjects.dog")
    # one line: what the file is not, and how to convert it safely; never torch's "weights_only=False" advice
    assert str(info.value) == ("subjects.dog: cannot read evil.pt: not a plain tensor file (read with "
                               "weights_only=True, which never runs code); to convert it, load it yourself where "
                               "you trust its source and save cones2.Residual(tensor).save('x.safetensors')")
    (tmp_path / "garbage.pt").write_bytes(b"neither zip nor pickle")
    with pytest.raises(cones2.Cones2Error, match="cannot read garbage.pt: not a plain tensor file"):
        cones2.Residual.load(tmp_path / "garbage.pt")


@pytest.mark.parametrize("tensor,msg", [
    (torch.tensor([[float("nan")] * 4]), "NaN"),
    (torch.ones(2, 3, 4), "shape"),
    (torch.ones(1, 4, dtype=torch.int64), "floating-point"),
])
def test_invalid_tensors(tensor, msg):
    with pytest.raises(cones2.Cones2Error, match=msg):
        cones2.Residual(tensor)


def test_dimension_must_match_model():
    with pytest.raises(cones2.Cones2Error, match="D=768 but the model's text encoder has D=1024") as info:
        cones2.Residual(torch.zeros(1, 768)).check_dim(1024, "subjects.dog")
    assert info.value.field == "subjects.dog"


def test_garbage_files(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(cones2.Cones2Error, match="not a readable safetensors"):
        cones2.Residual.load(tmp_path / "x.safetensors")
    with pytest.raises(cones2.Cones2Error, match="file not found"):
        cones2.Residual.load(tmp_path / "missing.safetensors")
    (tmp_path / "x.npy").write_bytes(b"")
    with pytest.raises(cones2.Cones2Error, match="unsupported file type"):
        cones2.Residual.load(tmp_path / "x.npy")


def test_engine_rejects_wrong_width(tiny_engine):
    with pytest.raises(cones2.Cones2Error, match="D=16"):
        tiny_engine.generate("a dog", {"dog": cones2.Residual(torch.zeros(1, 16))}, steps=1, height=64, width=64)
