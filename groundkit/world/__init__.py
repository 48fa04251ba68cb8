"""The built-in benchmark world: synthetic data sets in the real data sets' formats.

``generate(task, size, seed, out, progress, **knobs) -> Path`` builds (or reuses from the cache)
one task's data set; tasks (:data:`TASKS`, imported lazily): ``phrase`` (Wang et al. HDF5 trio +
Flickr30K Entities), ``refexp`` (RefCOCO / TransVG), ``video`` (VID-Sentence), ``pseudo``
(CLIP-VG pseudo labels), ``retrieval`` (Collaborative Experts). Scenes and rendering live in
:mod:`groundkit.world.scene`. See docs/benchmark_world.md.
"""

from pathlib import Path
from typing import Any

from ..config import ConfigError
from .core import (
    MANIFEST,
    SIZES,
    TASKS,
    WORLD_VERSION,
    CacheError,
    TaskUnavailableError,
    available_tasks,
    default_out,
    default_root,
    generate,
    load_manifest,
    verify,
)

__all__ = [
    "generate",
    "resolve_world",
    "load_manifest",
    "verify",
    "available_tasks",
    "default_out",
    "default_root",
    "TASKS",
    "SIZES",
    "WORLD_VERSION",
    "MANIFEST",
    "CacheError",
    "TaskUnavailableError",
]


def resolve_world(method: Any, cfg: Any, progress: bool = False) -> Any:
    """Point ``cfg.data.root`` at the built-in world that ``cfg.world`` names (building it once).

    ``method`` is a :class:`~groundkit.methods.base.Method` and ``cfg`` its config (an
    :class:`~groundkit.config.ExperimentConfig`). The task is ``cfg.world.task`` when the config names one (a method
    that trains on several tasks, e.g. cogrounding on ``refexp`` and ``video``), else ``method.world_task``. The method
    itself never imports the world: the command line, the demo and :mod:`groundkit.runs` call this before training.
    A ``data.root`` that is not the world's folder, given together with ``world.size``, is an error instead of being
    silently ignored; a config naming its own data files (``method.own_data``) keeps them and no world is built;
    ``method.use_world`` then fills the empty paths from the world. Returns ``cfg``.
    """
    world = cfg.world
    if not world.size or method.own_data(cfg):
        return cfg
    task = world.task or method.world_task
    if not task:
        raise ConfigError(
            f"world.size={world.size!r} but no world task: set world.task "
            f"(one of {', '.join(available_tasks())}) or clear world.size"
        )
    root = Path(generate(task, size=world.size, seed=world.seed, progress=progress))
    given = cfg.data.root
    if given and Path(given).expanduser().resolve() != root.resolve():
        raise ConfigError(
            f"data.root={given!r} and world.size={world.size!r} both name the data; clear one "
            f"(--set world.size= to train on data.root)"
        )
    cfg.data.root = str(root)
    method.use_world(cfg, root)
    return cfg
