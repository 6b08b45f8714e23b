"""The text side of the model: SentencePiece ids in (the persona prompt), words out (what the agent says).

PersonaPlex's text stream uses `tokenizer_spm_32k_3.model`. Four ids are not text: 0 (EPAD, "end of
padding", emitted just before a word starts), 1 (BOS), 2 (EOS) and 3 (PAD, "no word at this frame"). The
model emits one id per 80 ms frame, mostly PAD; a piece such as "▁hello" starts a word, so "▁" becomes a
space and the pieces concatenate into the transcript.
"""

from __future__ import annotations

import os

import sentencepiece

__all__ = ["TextTokenizer", "EPAD_ID", "BOS_ID", "EOS_ID", "PAD_ID", "wrap_with_system_tags"]

EPAD_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
_NOT_TEXT = (EPAD_ID, BOS_ID, EOS_ID, PAD_ID)
_WORD_START = "\u2581"  # SentencePiece's "▁": a space before the piece


def wrap_with_system_tags(persona: str) -> str:
    """`<system> {persona} <system>`, the form the model was trained on (kept as is if already wrapped)."""
    text = persona.strip()
    if text.startswith("<system>") and text.endswith("<system>") and len(text) >= len("<system>") * 2:
        return text
    return f"<system> {text} <system>"


class TextTokenizer:
    """A SentencePiece model: `encode` for prompts, `piece` for the model's text stream."""

    def __init__(self, path: str | os.PathLike):
        label = os.fspath(path)
        if not os.path.isfile(label):
            raise ValueError(f"{label}: SentencePiece model not found")
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            ok = self._sp.Load(label)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{label}: not a SentencePiece model ({e})") from None
        if not ok:
            raise ValueError(f"{label}: not a SentencePiece model")
        self.path = label
        self.vocab_size = int(self._sp.GetPieceSize())
        # id -> text, built once: the per-frame lookup is then one list index and no C call
        self._pieces: list[str | None] = [
            None if i in _NOT_TEXT or self._sp.IsControl(i) or self._sp.IsUnknown(i)
            else self._sp.IdToPiece(i).replace(_WORD_START, " ")
            for i in range(self.vocab_size)
        ]

    def encode(self, text: str) -> list[int]:
        """The ids of `text`, without BOS/EOS (as NVIDIA feeds the persona prompt)."""
        return list(self._sp.EncodeAsIds(text))

    def piece(self, token_id: int) -> str | None:
        """The text of one id from the model's text stream ("▁" as a space), or None for a non-text id."""
        if 0 <= token_id < self.vocab_size:
            return self._pieces[token_id]
        return None

    def decode(self, ids: list[int]) -> str:
        """The text of several ids, non-text ids dropped."""
        return "".join(p for p in (self.piece(i) for i in ids) if p is not None)
