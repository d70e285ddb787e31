"""Byte-level tokenizer: UTF-8 bytes are the tokens, there is no vocabulary file.

Ids 0-3 are the special tokens `<pad>`, `<s>` (bos), `</s>` (eos), `<unk>`; byte `b` is id `b + 4`; `len(tokenizer)`
is 260. Nothing is added around the text by default (set `add_bos_token=True` / `add_eos_token=True` to change it;
both are saved with the tokenizer). Prompts are padded on the left, as generation needs.

Text is bytes: a literal `"<pad>"`, `"<s>"` or `"</s>"` in the text is encoded as its bytes (five, three, four ids),
never as a special id, so `len(tokenizer(text, add_special_tokens=False).input_ids) == len(text.encode())` for any
text (what a bits-per-byte count relies on). Special ids come only from the tokenizer's own flags and arguments
(`add_special_tokens`, padding).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers.tokenization_python import AddedToken, PreTrainedTokenizer

BYTES = 256


class ByteTokenizer(PreTrainedTokenizer):
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        pad_token: str = "<pad>",
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        unk_token: str = "<unk>",
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        **kwargs,
    ):
        specials = [AddedToken(token, special=True) if isinstance(token, str) else token
                    for token in (pad_token, bos_token, eos_token, unk_token)]
        self._added_tokens_decoder = dict(enumerate(specials))
        self.offset = len(specials)
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        kwargs.setdefault("padding_side", "left")
        super().__init__(
            pad_token=specials[0],
            bos_token=specials[1],
            eos_token=specials[2],
            unk_token=specials[3],
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            **kwargs,
        )

    @property
    def vocab_size(self) -> int:
        return BYTES

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.convert_ids_to_tokens(index): index for index in range(self.offset + BYTES)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        ids = bos + token_ids_0 + eos
        return ids if token_ids_1 is None else ids + bos + token_ids_1 + eos

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos, eos = [1] * self.add_bos_token, [1] * self.add_eos_token
        mask = bos + [0] * len(token_ids_0) + eos
        return mask if token_ids_1 is None else mask + bos + [0] * len(token_ids_1) + eos

    def tokenize(self, text: str, **kwargs) -> list[str]:
        """One token per UTF-8 byte; special-token strings in the text are bytes like any other (no splitting on
        added tokens, whatever `split_special_tokens` says)."""
        return self._tokenize(text)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [chr(byte) for byte in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int:
        return ord(token) + self.offset if len(token) == 1 and ord(token) < BYTES else self.unk_token_id

    def _convert_id_to_token(self, index: int) -> str:
        return chr(index - self.offset)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        data = b"".join(
            token.encode("utf-8") if token in self.added_tokens_encoder else bytes([ord(token)]) for token in tokens
        )
        return data.decode("utf-8", errors="replace")

    def _save_pretrained(self, save_directory, file_names: tuple[str, ...], *args, **kwargs) -> tuple[str, ...]:
        # transformers 5 leaves `add_bos_token` / `add_eos_token` out of tokenizer_config.json (fast tokenizers keep
        # them in their post-processor); this tokenizer has none, so it writes them back before anything is uploaded.
        config_file = Path(file_names[0])
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config |= {"add_bos_token": self.add_bos_token, "add_eos_token": self.add_eos_token}
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
        return super()._save_pretrained(save_directory, file_names, *args, **kwargs)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()  # no vocabulary file: the vocabulary is the 256 byte values


__all__ = ["ByteTokenizer"]
