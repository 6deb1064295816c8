"""Caption templates for the residual (SPEC 1.5): the shipped list or a user file, and where the
subject word lands in each caption.

A template is one line with exactly one `{}`; blank lines and `#` comments are skipped. Everything
is checked before training starts, so a bad template never costs a finished run.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cones2 import Cones2Error
from cones2.tokens import SEQ_LEN, occurrences, prompt_token_ids

MAX_TEMPLATES = 10_000


def load_templates(path: str | None = None, field: str = "templates") -> list[str]:
    """The captions of `path` (or of the shipped `data/templates.txt` when None)."""
    if path is None:
        text = resources.files("cones2_train").joinpath("data/templates.txt").read_text(encoding="utf-8")
        where = "templates.txt"
    else:
        p = Path(path).expanduser()
        if not p.is_file():
            raise Cones2Error(f"file not found: {p}", field)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise Cones2Error(f"cannot read {p} as UTF-8 text ({type(exc).__name__})", field) from None
        where = p.name
    templates = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.count("{}") != 1:
            raise Cones2Error(f"{where} line {n}: a template needs exactly one '{{}}', got {line!r}", field)
        templates.append(line)
    if not templates:
        raise Cones2Error(f"{where} holds no templates", field)
    if len(templates) > MAX_TEMPLATES:
        raise Cones2Error(f"{where} holds {len(templates)} templates; at most {MAX_TEMPLATES}", field)
    return templates


@dataclass(frozen=True)
class Caption:
    """One template filled with the word: its 77 token ids and where the word's k tokens start."""

    text: str
    token_ids: tuple[int, ...]
    start: int


def captions_for(tokenizer, templates: list[str], word: str, word_ids: list[int],
                 field: str = "templates") -> list[Caption]:
    """Fill every template with `word` and locate the word's tokens (the ones that replace `{}`).

    The word must tokenize in the caption exactly as it does alone (so `{}s` is rejected) and fit
    before the end token. If the template itself also contains the word, the `{}` one is taken.
    """
    out = []
    for template in templates:
        text = template.replace("{}", word)
        ids = prompt_token_ids(tokenizer, text)
        end = ids.index(tokenizer.eos_token_id, 1) if tokenizer.eos_token_id in ids[1:] else SEQ_LEN
        starts = occurrences(ids, word_ids, end)
        prefix = template.split("{}")[0].strip()
        expected = 1 + (len(tokenizer(prefix, add_special_tokens=False).input_ids) if prefix else 0)
        if expected in starts:
            start = expected
        elif len(starts) == 1:
            start = starts[0]
        else:
            if starts:
                reason = "cannot be told apart from the template's own text"
            elif end == SEQ_LEN:
                reason = "is cut off by the 77-token limit"
            else:
                reason = "does not tokenize there as it does alone (e.g. '{}s')"
            raise Cones2Error(f"in {template!r} the word {word!r} {reason}", field)
        out.append(Caption(text, tuple(ids), start))
    return out
