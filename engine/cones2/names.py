"""Close-name suggestions for error messages ("did you mean 'heart'?"), so a typo reads as one."""
from __future__ import annotations

import difflib
import re
from typing import Iterable

WORD = re.compile(r"[\w'-]+")


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """" (did you mean 'x'?)" for the closest candidate to `name`, or "" when none is close."""
    pool = sorted({str(c) for c in candidates if str(c) != name})
    close = difflib.get_close_matches(name, pool, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def prompt_words(prompt: str) -> list[str]:
    """The words of a prompt, lower-cased (the candidates for a subject name)."""
    return WORD.findall(prompt.lower())
