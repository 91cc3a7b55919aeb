"""The main job as an API: noisy data -> distilled set (+ TAD) -> evaluation -> baselines -> report.

``run(RunConfig(...)) -> metrics dict`` is what ``ddfast run`` does; ``evaluate_dir`` is ``ddfast evaluate``,
``privacy_dir`` is ``ddfast privacy`` and ``environment_info`` is ``ddfast info``. Modules: ``config`` (:class:`RunConfig`, the typed overrides and
:func:`resolve`, which checks every setting before any work starts), ``stages`` (the stages and the one
cached-stage helper, :class:`~ddfast.pipeline.stages.StageRunner`), ``run`` (:func:`run`, :func:`evaluate_dir`).

Rerunning the same command resumes: finished stages are read back, the distiller resumes from its checkpoint
(exactly: ``Distiller.run`` restores the generator state), TAD from its last finished round.

Caches (``$DDFAST_CACHE``, default ``~/.cache/ddfast``): ``distill/`` is the distillers' ``cache_dir``
(expert trajectories, model pools -- keyed by the distiller from the dataset, the labels it sees including
TAD's trusted set and pseudo-labels, and its config); ``baselines/`` holds baseline results keyed by dataset,
noise spec + seed (and a digest of the noisy labels), IPC, seed and the baseline's config.

Under ``torchrun`` (:mod:`ddfast.distributed`) evaluation runs and baselines are sharded over the ranks and
rank 0 writes every file.
"""
from ..baselines import BASELINES, DEFAULT_BASELINES, BaselineConfig
from ..evaluate import synset_eval_config
from .config import (DEMO, DEMO_OVERRIDES, OVERRIDE_SECTIONS, DataOptions, ResolvedRun, RunConfig, RunConfigMismatch,
                     UsageError, default_cache_dir, parse_overrides, resolve, resolve_device)
from .run import METRICS_SCHEMA, environment_info, evaluate_dir, privacy_dir, run

__all__ = [
    "RunConfig",
    "RunConfigMismatch",
    "UsageError",
    "DataOptions",
    "ResolvedRun",
    "BaselineConfig",
    "resolve",
    "run",
    "evaluate_dir",
    "privacy_dir",
    "environment_info",
    "default_cache_dir",
    "BASELINES",
    "DEFAULT_BASELINES",
    "DEMO",
    "DEMO_OVERRIDES",
    "OVERRIDE_SECTIONS",
    "METRICS_SCHEMA",
    "parse_overrides",
    "resolve_device",
    "synset_eval_config",
]
