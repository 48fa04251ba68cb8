"""The built-in benchmark world: synthetic data sets in the real data sets' formats.

``generate(task, size, seed, out, progress, **knobs) -> Path`` builds (or reuses from the cache)
one task's data set; tasks (:data:`TASKS`, imported lazily): ``phrase`` (Wang et al. HDF5 trio +
Flickr30K Entities), ``refexp`` (RefCOCO / TransVG), ``video`` (VID-Sentence), ``pseudo``
(CLIP-VG pseudo labels), ``retrieval`` (Collaborative Experts). Scenes and rendering live in
:mod:`groundkit.data.synth.scene`. See docs/benchmark_world.md.
"""

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
