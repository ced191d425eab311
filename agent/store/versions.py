"""Model versions (register, deploy, roll back) and training runs."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Select, select, update

from agent.errors import NotFoundError, ValidationError
from agent.store.base import StoreBase
from agent.store.models import MODEL_KINDS, ModelVersion, TrainingRun, utcnow


def previously_deployed(current_id: int) -> Select[ModelVersion]:
    """The version a rollback from `current_id` returns to: the last one deployed before it."""
    return (
        select(ModelVersion)
        .where(
            ModelVersion.status == "retired",
            ModelVersion.deployed_at.is_not(None),
            ModelVersion.id != current_id,
        )
        .order_by(ModelVersion.deployed_at.desc(), ModelVersion.id.desc())
        .limit(1)
    )


POLICY_KINDS = ("base", "sft", "ppo")


class VersionsAndRuns(StoreBase):
    """Policies, reward models and adapters on disk, which one is served, and the jobs' runs."""

    # ---- model versions ----------------------------------------------------------------

    def register_model_version(
        self,
        kind: str,
        path: str,
        *,
        name: str = "",
        parent_id: int | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> int:
        """Record a model on disk as a candidate. Nothing is served until it is deployed."""
        if kind not in MODEL_KINDS:
            raise ValidationError(f"kind: {kind!r} is not one of {', '.join(MODEL_KINDS)}")
        with self.transaction() as s:
            mv = ModelVersion(
                kind=kind, path=str(path), name=name, parent_id=parent_id, metrics=metrics or {}
            )
            s.add(mv)
            s.flush()
            return mv.id

    def update_model_version(
        self, version_id: int, *, path: str | None = None, metrics: dict[str, Any] | None = None
    ) -> None:
        with self.transaction() as s:
            mv = s.get(ModelVersion, version_id)
            if mv is None:
                raise NotFoundError(f"no model version with id {version_id}")
            if path is not None:
                mv.path = str(path)
            if metrics is not None:
                mv.metrics = {**mv.metrics, **metrics}

    def get_model_version(self, version_id: int) -> ModelVersion:
        with self.reading() as s:
            mv = s.get(ModelVersion, version_id)
            if mv is None:
                raise NotFoundError(
                    f"no model version with id {version_id}; `rlchat models list` shows them"
                )
            return mv

    def list_model_versions(self, kind: str | None = None) -> list[ModelVersion]:
        stmt = select(ModelVersion).order_by(ModelVersion.id)
        if kind is not None:
            stmt = stmt.where(ModelVersion.kind == kind)
        with self.reading() as s:
            return list(s.scalars(stmt))

    def deployed_version(self) -> ModelVersion | None:
        with self.reading() as s:
            stmt = select(ModelVersion).where(ModelVersion.status == "deployed")
            return s.scalars(stmt).one_or_none()

    def deploy(self, version_id: int) -> ModelVersion:
        """Make `version_id` the one served policy, in one transaction."""
        with self.transaction() as s:
            mv = s.get(ModelVersion, version_id)
            if mv is None:
                raise NotFoundError(f"no model version with id {version_id}")
            if mv.kind not in POLICY_KINDS:
                raise ValidationError(
                    f"model version {version_id} is a {mv.kind} model; only "
                    f"{', '.join(POLICY_KINDS)} versions can be deployed"
                )
            if mv.status == "deployed":
                return mv
            s.execute(
                update(ModelVersion)
                .where(ModelVersion.status == "deployed")
                .values(status="retired")
            )
            s.flush()
            mv.status, mv.deployed_at = "deployed", utcnow()
            return mv

    def rollback(self) -> ModelVersion:
        """Retire the deployed policy and redeploy the one deployed before it."""
        with self.transaction() as s:
            current = s.scalars(
                select(ModelVersion).where(ModelVersion.status == "deployed")
            ).one_or_none()
            if current is None:
                raise NotFoundError("nothing is deployed, so there is nothing to roll back")
            previous = s.scalars(previously_deployed(current.id)).one_or_none()
            if previous is None:
                raise NotFoundError(
                    f"model version {current.id} is the only one ever deployed; nothing to roll back to"
                )
            current.status = "rolled_back"
            s.flush()
            previous.status, previous.deployed_at = "deployed", utcnow()
            return previous

    # ---- training runs -----------------------------------------------------------------

    def start_run(
        self,
        kind: str,
        config: dict[str, Any],
        *,
        data_cutoff: datetime | None = None,
        data_ids: dict[str, Any] | None = None,
        log_path: str = "",
    ) -> int:
        with self.transaction() as s:
            run = TrainingRun(
                kind=kind,
                config=config,
                data_cutoff=data_cutoff,
                data_ids=data_ids or {},
                log_path=log_path,
            )
            s.add(run)
            s.flush()
            return run.id

    def update_run(self, run_id: int, **fields: Any) -> None:
        """Set fields of a run (status, metrics, data_ids, output_version_id, error, ...).

        `metrics` is merged into what is there; status succeeded/failed stamps finished_at.
        """
        with self.transaction() as s:
            run = s.get(TrainingRun, run_id)
            if run is None:
                raise NotFoundError(f"no training run with id {run_id}")
            if "metrics" in fields:
                fields["metrics"] = {**run.metrics, **fields["metrics"]}
            for key, value in fields.items():
                setattr(run, key, value)
            if fields.get("status") in ("succeeded", "failed"):
                run.finished_at = utcnow()

    def get_run(self, run_id: int) -> TrainingRun:
        with self.reading() as s:
            run = s.get(TrainingRun, run_id)
            if run is None:
                raise NotFoundError(f"no training run with id {run_id}")
            return run

    def list_runs(self, kind: str | None = None) -> list[TrainingRun]:
        stmt = select(TrainingRun).order_by(TrainingRun.id)
        if kind is not None:
            stmt = stmt.where(TrainingRun.kind == kind)
        with self.reading() as s:
            return list(s.scalars(stmt))
