"""Tokenizers and chat formats: Llama 3 (tiktoken), Llama 2 (sentencepiece), GGUF/HF vocabularies.

    tok = cfjax.tokenizer.load("llama3")          # or a model dir, a tokenizer file, a .gguf
    ids = tok.chat([{"role": "user", "content": "Hi"}])   # ends with the assistant header
    tok.encode("text")                            # no BOS; "<|eot_id|>" in text stays plain text
    tok.decode(ids), tok.stop_tokens, tok.spec    # spec: what load() needs to rebuild it

Text edits are made on characters: `char_span_to_token_span` gives the tokens that cover them and
`StreamDecoder` turns ids into text without splitting a UTF-8 character.
"""

from cfjax.tokenizer.base import Tokenizer, check_vocab
from cfjax.tokenizer.chat import CHATML_TEMPLATE, LLAMA2_TEMPLATE, LLAMA3_TEMPLATE, render
from cfjax.tokenizer.gguf_vocab import from_gguf
from cfjax.tokenizer.hf import HFTokenizer
from cfjax.tokenizer.llama3 import Llama3Tokenizer
from cfjax.tokenizer.loader import llama3_tokenizer_file, load, smollm2_gguf_file
from cfjax.tokenizer.spm import SentencePieceTokenizer
from cfjax.tokenizer.stream import (
    StreamDecoder,
    char_span_to_token_span,
    stream_decode,
    token_char_spans,
)

__all__ = [
    "CHATML_TEMPLATE",
    "LLAMA2_TEMPLATE",
    "LLAMA3_TEMPLATE",
    "HFTokenizer",
    "Llama3Tokenizer",
    "SentencePieceTokenizer",
    "StreamDecoder",
    "Tokenizer",
    "char_span_to_token_span",
    "check_vocab",
    "from_gguf",
    "llama3_tokenizer_file",
    "load",
    "render",
    "smollm2_gguf_file",
    "stream_decode",
    "token_char_spans",
]
