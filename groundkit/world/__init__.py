"""The built-in benchmark world: synthetic data sets in the real data sets' formats.

``generate(task, size, seed, out, progress, **knobs) -> Path`` builds (or reuses from the cache)
one task's data set; tasks (:data:`TASKS`, imported lazily): ``phrase`` (Wang et al. HDF5 trio +
Flickr30K Entities), ``refexp`` (RefCOCO / TransVG), ``video`` (VID-Sentence), ``pseudo``
(CLIP-VG pseudo labels), ``retrieval`` (Collaborative Experts). Scenes and rendering live in
:mod:`groundkit.world.scene`. See docs/benchmark_world.md.
"""

from pathlib import Path

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


def resolve_world(method: object, cfg: object, progress: bool = False) -> object:
    """Point ``cfg.data.root`` at the built-in world that ``cfg.data.synth_size`` names (building it once).

    The task is ``cfg.data.world_task`` when the config names one (a method that trains on several
    tasks, e.g. cogrounding on ``refexp`` and ``video``), else ``method.world_task`` (e.g. ``"retrieval"``).
    The method itself never imports the world: the command line, the demo and :mod:`groundkit.runs`
    call this before training. A ``data.root`` that is not the world's folder, given together with
    ``data.synth_size``, is an error instead of being silently ignored; a config naming its own data files
    (``method.own_data``) keeps them and no world is built; ``method.use_world`` then fills the empty paths
    from the world. Returns ``cfg``.
    """

    data = getattr(cfg, "data", None)
    size = getattr(data, "synth_size", "")
    task = getattr(data, "world_task", "") or getattr(method, "world_task", "")
    if not size or (hasattr(method, "own_data") and method.own_data(cfg)):
        return cfg
    if not task:
        raise ConfigError(
            f"data.synth_size={size!r} but no world task: set data.world_task "
            f"(one of {', '.join(available_tasks())}) or clear data.synth_size"
        )
    root = Path(generate(task, size=size, seed=int(getattr(data, "synth_seed", 0)), progress=progress))
    given = getattr(data, "root", "")
    if given and Path(given).expanduser().resolve() != root.resolve():
        raise ConfigError(
            f"data.root={given!r} and data.synth_size={size!r} both name the data; clear one "
            f"(--set data.synth_size= to train on data.root)"
        )
    data.root = str(root)
    if hasattr(method, "use_world"):
        method.use_world(cfg, root)
    return cfg
