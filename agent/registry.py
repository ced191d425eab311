"""Model versions on disk: `<data_dir>/models/<id>/`, registered in the `model_versions` table.

    registry = ModelRegistry(store, settings)
    base_id = registry.add("base", "/path/to/hf-model-dir")      # or a hub id: no copy
    sft_id = registry.add("sft", "/path/to/lora-adapter", parent_id=base_id)
    registry.deploy(sft_id)                                      # running agents pick it up
    registry.resolve(sft_id)  # PolicySpec(base=".../models/1", adapters=[".../models/2"])

`add` is crash-safe: the files are copied into a temporary directory first, then the row is
inserted and the directory renamed to `<id>/` inside one database transaction, so a committed
row always points at complete files (a crash leaves at most an unreferenced temp directory or
an orphan `<id>/` directory that the next `add` of that id replaces).
"""

from __future__ import annotations

import logging
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import Settings
from agent.errors import NotFoundError, ValidationError
from agent.store.api import POLICY_KINDS, Store
from agent.store.models import MODEL_KINDS, ModelVersion
from agent.store.versions import previously_deployed

log = logging.getLogger(__name__)

ADAPTER_KINDS = ("sft", "ppo")
"""Policy kinds stored as a LoRA adapter on top of their parent version."""
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"


@dataclass
class PolicySpec:
    """What to load to serve one policy version."""

    base: str
    """Base model: a Hugging Face model directory or hub id."""
    adapters: list[str] = field(default_factory=list)
    """LoRA adapter directories, bottom-up (sft first, then ppo)."""


class ModelRegistry:
    """Model files under `<data_dir>/models/` plus their rows, deploy and rollback."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    @property
    def root(self) -> Path:
        return self.settings.models_dir

    # ---- adding ------------------------------------------------------------------------

    def add(
        self,
        kind: str,
        src: str | Path,
        *,
        name: str = "",
        parent_id: int | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> int:
        """Copy the directory `src` into `<data_dir>/models/<id>/` and register a candidate.

        kind "base" may also be a hub id (a string that is not a directory): registered as is.
        sft/ppo need `parent_id` (the policy they were trained on) and a LoRA adapter directory.
        """
        if kind not in MODEL_KINDS:
            raise ValidationError(f"kind: {kind!r} is not one of {', '.join(MODEL_KINDS)}")
        src_path = Path(src)
        self._check_parent(kind, parent_id)
        if not src_path.is_dir():
            if kind == "base" and _looks_like_hub_id(str(src)):
                return self.store.register_model_version(
                    kind, str(src), name=name or str(src), metrics=metrics
                )
            raise NotFoundError(
                f"src: looked for a model directory at {src_path.resolve()} and found none; "
                "give the directory the model was saved to (or, for a base, a hub id org/name)"
            )
        self._check_files(kind, src_path)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        try:
            shutil.copytree(src_path, tmp)
            return self._register_and_rename(kind, tmp, name, parent_id, metrics)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _register_and_rename(
        self,
        kind: str,
        tmp: Path,
        name: str,
        parent_id: int | None,
        metrics: dict[str, Any] | None,
    ) -> int:
        """Insert the row and move the complete files to `<id>/` in one transaction."""
        final: Path | None = None
        try:
            with self.store.transaction() as s:
                mv = ModelVersion(
                    kind=kind, name=name, parent_id=parent_id, path="", metrics=metrics or {}
                )
                s.add(mv)
                s.flush()
                final = (self.root / str(mv.id)).resolve()
                if final.exists():  # left by a crash after a rename whose commit never happened
                    log.warning("replacing orphan model directory %s", final)
                    shutil.rmtree(final)
                tmp.rename(final)
                mv.path = str(final)
                version_id = mv.id
        except BaseException:
            if final is not None and final.exists() and not tmp.exists():
                final.rename(tmp)  # the row was not committed: take the files back out
            raise
        log.info("registered %s model version %d at %s", kind, version_id, final)
        return version_id

    def _check_parent(self, kind: str, parent_id: int | None) -> None:
        if kind in ADAPTER_KINDS and parent_id is None:
            raise ValidationError(
                f"parent_id: a {kind} adapter needs the id of the policy it was trained on"
            )
        if parent_id is None:
            return
        parent = self.store.get_model_version(parent_id)
        if kind in ADAPTER_KINDS and parent.kind not in POLICY_KINDS:
            raise ValidationError(
                f"parent_id: version {parent_id} is a {parent.kind} model; a {kind} adapter "
                f"sits on a policy ({', '.join(POLICY_KINDS)})"
            )

    @staticmethod
    def _check_files(kind: str, src: Path) -> None:
        if kind in ADAPTER_KINDS and not (src / ADAPTER_CONFIG).is_file():
            raise ValidationError(
                f"src: {src} has no {ADAPTER_CONFIG}; a {kind} version is a LoRA adapter "
                "directory saved with peft's save_pretrained"
            )
        if kind == "base" and not (src / MODEL_CONFIG).is_file():
            raise ValidationError(
                f"src: {src} has no {MODEL_CONFIG}; a base version is a Hugging Face model "
                "directory saved with save_pretrained"
            )

    # ---- reading -----------------------------------------------------------------------

    def get(self, version_id: int) -> ModelVersion:
        return self.store.get_model_version(version_id)

    def versions(self, kind: str | None = None) -> list[ModelVersion]:
        return self.store.list_model_versions(kind)

    def resolve(self, version_id: int) -> PolicySpec:
        """The base and the adapter stack of a policy version, walking `parent_id` to the base."""
        chain: list[ModelVersion] = []
        cursor: int | None = version_id
        while cursor is not None:
            mv = self.store.get_model_version(cursor)
            if any(seen.id == mv.id for seen in chain):
                raise ValidationError(f"model version {version_id}: its parents form a cycle")
            if mv.kind not in POLICY_KINDS:
                raise ValidationError(
                    f"model version {mv.id} is a {mv.kind} model, not a policy "
                    f"({', '.join(POLICY_KINDS)})"
                )
            chain.append(mv)
            cursor = mv.parent_id if mv.kind in ADAPTER_KINDS else None
            if mv.kind in ADAPTER_KINDS and cursor is None:
                raise ValidationError(
                    f"model version {mv.id} ({mv.kind}) has no parent, so it has no base model"
                )
        base, *adapters = chain[::-1]
        return PolicySpec(base=base.path, adapters=[a.path for a in adapters])

    def check_files(self, spec: PolicySpec) -> None:
        """Every directory of `spec` is present and complete (hub-id bases are not checked)."""
        base = Path(spec.base)
        if base.is_absolute() or base.exists():
            self._check_present(base, MODEL_CONFIG)
        for adapter in spec.adapters:
            self._check_present(Path(adapter), ADAPTER_CONFIG)

    @staticmethod
    def _check_present(directory: Path, required: str) -> None:
        if not (directory / required).is_file():
            raise NotFoundError(
                f"model files missing: looked for {directory / required}; the version's "
                "directory was moved or deleted"
            )

    # ---- serving -----------------------------------------------------------------------

    def deploy(self, version_id: int) -> ModelVersion:
        """Serve `version_id` from the next turn of every running agent.

        The files are checked before the pointer moves; the move itself is one transaction.
        """
        self.check_files(self.resolve(version_id))
        mv = self.store.deploy(version_id)
        log.info("deployed model version %d (%s)", mv.id, mv.kind)
        return mv

    def rollback(self) -> ModelVersion:
        """Return to the policy deployed before the current one, once its files are checked."""
        target = self._rollback_target()
        if target is not None:
            self.check_files(self.resolve(target))
        mv = self.store.rollback()
        log.info("rolled back to model version %d (%s)", mv.id, mv.kind)
        return mv

    def deployed(self) -> ModelVersion | None:
        return self.store.deployed_version()

    def _rollback_target(self) -> int | None:
        """The version `Store.rollback` would redeploy (None: it will refuse and say why)."""
        current = self.store.deployed_version()
        if current is None:
            return None
        with self.store.reading() as s:
            previous = s.scalars(previously_deployed(current.id)).one_or_none()
            return previous.id if previous is not None else None


def _looks_like_hub_id(name: str) -> bool:
    """`org/name` or `name`: no path separators beyond one slash, not absolute, not relative."""
    if not name or name.startswith((".", "/", "~")) or "\\" in name:
        return False
    return name.count("/") <= 1 and all(part.strip() for part in name.split("/"))
