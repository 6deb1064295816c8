"""Issue 26, item 4: what used to be accepted silently is now one clear line (exit 2 in the CLI, the
same `Cones2Error` in the API), with a did-you-mean where a close name exists."""
from __future__ import annotations

import json

import pytest
import torch

import cones2
from cli_support import cli

BOX = "0.1,0.1,0.5,0.5"


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("flags,needles", [
    (["--box", f"heart={BOX}", "--strength", "hart=3"], ["--strength", "'hart'", "did you mean 'heart'?"]),
    (["--box", f"hart={BOX}"], ["--box", "'hart' does not occur in the prompt", "did you mean 'heart'?"]),
    (["--box", f"heart={BOX}", "--box", "heart=0,0,1,1"], ["--box", "'heart' is given twice"]),
    (["--subject", "heart=a.safetensors", "--subject", "heart=b.safetensors"], ["--subject", "'heart' is given twice"]),
    (["--guidance-steps", "40", "--steps", "4"], ["guidance_steps", "is 40 but there are only 4 steps"]),
    (["--color", "255,0,0=heart"], ["--color needs --color-map"]),
    (["--seed", "5-2"], ["--seed", "runs backwards"]),
    (["--bogus-flag"], ["unrecognized arguments: --bogus-flag", "cones2-engine generate --help"]),
])
def test_cli_refuses_with_one_line(flags, needles):
    _one_line_error(cli("generate", "--prompt", "a heart on sand", *flags), *needles)


def test_api_refuses_the_same(tiny_engine):
    with pytest.raises(cones2.Cones2Error, match=r"^layout.strengths: .*'hart'.*did you mean 'heart'\?"):
        cones2.Layout.from_boxes({"heart": (0, 0, 0.5, 0.5)}, strengths={"hart": 3})
    with pytest.raises(cones2.Cones2Error, match=r"^guidance_steps: is 40 but there are only 4 steps"):
        tiny_engine.generate("a heart", steps=4, guidance_steps=40, progress=False)
    with pytest.raises(cones2.Cones2Error, match=r"^layout: must be a cones2.Layout .* got dict"):
        tiny_engine.generate("a heart", {}, {"heart": (0, 0, 0.5, 0.5)}, steps=2, progress=False)
    layout = cones2.Layout.from_boxes({"hart": (0, 0, 0.5, 0.5)})
    with pytest.raises(cones2.Cones2Error, match=r"'hart' does not occur in the prompt \(did you mean 'heart'\?\)"):
        tiny_engine.check(tiny_engine.request("a heart on sand", layout=layout))


def test_check_uses_the_defaults_generate_uses(tiny_engine):
    """A bare GenerationRequest is judged at the model's own size (128 px for the tiny model), as
    `generate_batch` makes it: a box that vanishes there fails `check` too."""
    tiny = cones2.Layout.from_boxes({"dog": (0.0, 0.0, 0.003, 0.003)})   # 2 px at 768, nothing at 128
    request = cones2.GenerationRequest("a dog", {}, tiny)
    with pytest.raises(cones2.Cones2Error, match="region is empty at 128x128"):
        tiny_engine.check(request)
    with pytest.raises(cones2.Cones2Error, match="region is empty at 128x128"):
        tiny_engine.generate_batch([request], progress=False)
    fine = cones2.GenerationRequest("a dog", {}, cones2.Layout.from_boxes({"dog": (0, 0, 0.5, 0.5)}))
    assert [t.name for t in tiny_engine.check(fine)] == ["dog"]


def test_fingerprint_ignores_dtype_and_tells_models_apart(tiny_model_dir, tiny_eps_model_dir, tiny_engine):
    bf16 = cones2.Engine.from_pretrained(tiny_model_dir, dtype="bf16", backend="reference")
    other = cones2.Engine.from_pretrained(tiny_eps_model_dir, backend="reference")
    assert bf16.fingerprint == tiny_engine.fingerprint != other.fingerprint
    unet = bf16.unet
    names = [n for n, _ in unet.named_parameters() if ".attn2.to_k." in n]
    with torch.no_grad():
        p = dict(unet.named_parameters())[names[0]]
        p.view(-1)[0] = -p.view(-1)[0]
    from cones2.loading import model_fingerprint

    assert model_fingerprint(bf16.text_encoder, unet) != tiny_engine.fingerprint


def _residual(tmp_path, fingerprint, word="dog"):
    path = tmp_path / f"{word}-{fingerprint[:6]}.safetensors"
    cones2.Residual(0.1 * torch.ones(1, 32), word=word, base_model="somewhere@1",
                    metadata={"base_fingerprint": fingerprint}).save(path)
    return path


def test_foreign_residual_is_refused_unless_allowed(tmp_path, tiny_model_dir, tiny_engine):
    foreign = _residual(tmp_path, "0123456789abcdef")
    common = ["generate", "--model", tiny_model_dir, "--prompt", "a dog", "--resolution", 64, "--steps", 1,
              "--no-progress", "--out", tmp_path / "o.png", "--subject", f"dog={foreign}"]
    _one_line_error(cli(*common), "subjects.dog", "trained on model 0123456789abcdef", "--allow-foreign-residual")
    assert not (tmp_path / "o.png").exists()
    assert cli(*common, "--allow-foreign-residual").returncode == 0
    with pytest.raises(cones2.Cones2Error, match="^subjects.dog: residual was trained on model 0123456789abcdef"):
        tiny_engine.generate("a dog", {"dog": cones2.Residual.load(foreign)}, steps=1, progress=False)

    info = json.loads(cli("info", "--model", tiny_model_dir, "--json", "--residual", foreign,
                          "--residual", _residual(tmp_path, tiny_engine.fingerprint)).stdout)
    checks = {k.rsplit("/", 1)[-1]: v for k, v in info["residuals"].items()}
    assert checks[foreign.name]["fingerprint_check"].startswith("differs: trained on 0123456789abcdef")
    assert checks[foreign.name]["fits_model"] is False
    own = checks[f"dog-{tiny_engine.fingerprint[:6]}.safetensors"]
    assert own["fingerprint_check"] == f"matches ({tiny_engine.fingerprint})" and own["fits_model"] is True


def test_residual_word_mismatch_warns_once(tmp_path, tiny_model_dir, tiny_engine):
    heart = _residual(tmp_path, tiny_engine.fingerprint, word="heart")
    proc = cli("generate", "--model", tiny_model_dir, "--prompt", "a circle", "--resolution", 64, "--steps", 1,
               "--no-progress", "--out", tmp_path / "o.png", "--subject", f"circle={heart}")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "trained for the word" in line]
    assert warnings == ["subjects.circle: the residual was trained for the word 'heart', used here for 'circle'"]
