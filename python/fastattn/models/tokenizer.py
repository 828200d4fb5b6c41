"""A byte-level tokenizer: ids 0..255 are the bytes of the UTF-8 text, then two
specials. Nothing to download or train."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor


class ByteTokenizer:
    """Bytes 0..255, EOS = 256 (separates documents; starts an empty prompt),
    MASK = 257 (masked-token prediction). vocab_size = 258."""

    EOS = 256
    MASK = 257
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_tensor(self, text: str) -> Tensor:
        """(len,) int64 ids."""
        return torch.tensor(self.encode(text), dtype=torch.long)

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes back to text; special ids are dropped, invalid UTF-8 is replaced."""
        data = bytes(i for i in (int(t) for t in ids) if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")
