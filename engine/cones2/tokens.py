"""Where each subject sits in the tokenized prompt (SPEC sections 2 and 3).

A subject word may tokenize to several tokens and occur several times; positions count token 0 as
the start token, exactly like the reference's `subject_list`.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import limits
from .errors import Cones2Error, quote
from .names import did_you_mean, prompt_words

SEQ_LEN = 77


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """The 77 token ids the text encoder sees for `prompt` (start, words, end, padding)."""
    return tokenizer(prompt, padding="max_length", max_length=SEQ_LEN, truncation=True).input_ids


def word_token_ids(tokenizer, word: str, field: str = "subject") -> list[int]:
    """Token ids of `word` alone, without start/end tokens."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise Cones2Error(f"{quote(word)} tokenizes to nothing", field)
    return list(ids)


def occurrences(sequence: list[int], pattern: list[int], end: int | None = None) -> list[int]:
    """Start indices of the occurrences of `pattern` in `sequence[1:end]`, left to right, not overlapping.

    Only the prompt's own tokens are searched: never the start token, the end token or padding.
    """
    k, found, i = len(pattern), [], 1
    end = len(sequence) if end is None else end
    while i + k <= end:
        if sequence[i : i + k] == pattern:
            found.append(i)
            i += k
        else:
            i += 1
    return found


@dataclass(frozen=True)
class SubjectTokens:
    """One subject's token positions in a prompt.

    word_positions: every position of every occurrence of the word's full token sequence (these get
    the layout weight, SPEC 3). residual_starts: where the residual's rows are added (SPEC 2): the
    start of each occurrence, or the user's explicit positions.
    """

    name: str
    token_ids: tuple[int, ...]
    word_positions: tuple[int, ...]
    residual_starts: tuple[int, ...]


class Located(list):
    """`Engine.check`'s answer: each subject's `SubjectTokens` (a plain list to its callers) plus
    `prompt_ids`, the prompt's 77 token ids they were found in, so that preparing the request for
    sampling encodes those ids instead of tokenizing the prompt again."""

    def __init__(self, subjects=(), prompt_ids=()):
        super().__init__(subjects)
        self.prompt_ids = tuple(prompt_ids)


def locate_subject(tokenizer, prompt_ids: list[int], name: str, explicit: list[int] | None = None,
                   field: str = "subjects", prompt: str | None = None) -> SubjectTokens:
    """Find `name` in the prompt; a subject that is not there is an error that names it.

    prompt: the prompt's text, to tell a word past the 77-token cut-off from a missing one (without
    it, a prompt that fills all 77 tokens is reported as possibly cut off)."""
    limits.name(name, field)
    ids = word_token_ids(tokenizer, name, f"{field}.{name}")
    end_id = tokenizer.eos_token_id
    end = prompt_ids.index(end_id, 1) if end_id in prompt_ids[1:] else len(prompt_ids)
    starts = occurrences(prompt_ids, ids, end)
    word_positions = tuple(s + j for s in starts for j in range(len(ids)))
    if explicit is not None:
        last = len(prompt_ids) - 2
        residual_starts = tuple(limits.positions(explicit, f"{field}.{name}.positions", last))
    elif not starts:
        raise Cones2Error(_not_found(tokenizer, prompt_ids, ids, name, prompt), f"{field}.{name}")
    else:
        residual_starts = tuple(starts)
    return SubjectTokens(name, tuple(ids), word_positions, residual_starts)


def _not_found(tokenizer, prompt_ids: list[int], ids: list[int], name: str, prompt: str | None) -> str:
    """Why `name` is not among the prompt's tokens: absent, or past the text encoder's cut-off."""
    kept = SEQ_LEN - 2
    if prompt is not None:
        full = tokenizer(prompt, add_special_tokens=False, truncation=True, max_length=100 * SEQ_LEN).input_ids
        hits = occurrences([None, *full], ids)
        if hits:
            return (f"subject {quote(name)} lies past the prompt's {SEQ_LEN}-token limit (it starts at token "
                    f"{hits[0]}; the text encoder reads tokens 1..{kept} only): move it earlier or shorten the prompt")
    elif prompt_ids[-2] not in (tokenizer.eos_token_id, tokenizer.pad_token_id):
        return (f"subject {quote(name)} does not occur in the first {kept} tokens of the prompt "
                f"(the prompt fills all {SEQ_LEN} tokens; a word past that limit is cut off)")
    hint = did_you_mean(name.lower(), prompt_words(prompt)) if prompt is not None else ""
    return f"subject {quote(name)} does not occur in the prompt{hint}"
