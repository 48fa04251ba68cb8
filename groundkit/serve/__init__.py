"""``groundkit serve``: a local web page to try trained runs by hand, with a JSON API beside it.

>>> from groundkit.serve import load_runs, create_app
>>> app = create_app(load_runs(["runs/crosskd/synth_cecap"]))   # an ASGI app (FastAPI)

The page adapts to each run's predictor kind (:class:`groundkit.methods.base.Predictor`): an
``image_text`` run takes an uploaded image and an expression and answers the image with the box drawn;
a ``text_video`` run takes a text and answers the ranked videos of its indexed collection (with their
frames when the collection has them on disk). Endpoints, limits and security choices: docs/serve.md.
"""

from __future__ import annotations

from typing import Any

from .images import InputError, Limits
from .table import ServedRun, load_runs

__all__ = ["InputError", "Limits", "ServedRun", "create_app", "load_runs"]


def create_app(*args: Any, **kwargs: Any) -> Any:
    """:func:`groundkit.serve.app.create_app` (FastAPI is imported on first use)."""
    from .app import create_app as _create  # noqa: PLC0415

    return _create(*args, **kwargs)
