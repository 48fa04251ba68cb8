"""The declared interface between a method and the rest of groundkit.

A method is a :class:`Method` subclass in ``groundkit/methods/<name>/``; one instance (``METHOD``)
is registered in :mod:`groundkit.methods`. The engine, the command line, the demo, the benchmarks
and the web page only ever call the members below; every optional member has a working default,
so nothing is probed with ``hasattr``.

Required: ``name``, ``config_class``, :meth:`Method.build_model`, :meth:`Method.build_dataset`,
:meth:`Method.training_step`, and either :meth:`Method.evaluate` or the pair
:meth:`Method.eval_step` / :meth:`Method.compute_metrics`. A method's datasets are
:class:`GroundingDataset` subclasses: the engine reads batches through that protocol, never by probing.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import ExperimentConfig, to_dict
from ..engine import evaluate_samples
from ..runlog import format_metrics

__all__ = ["Method", "Predictor", "Figure", "GroundingDataset"]


class GroundingDataset(torch.utils.data.Dataset):
    """The samples of one split, as the engine reads them: ``__len__``, and either a vectorised
    :meth:`get_batch` (``batched = True``) or ``__getitem__`` plus :meth:`collate` (DataLoader workers
    with ``train.num_workers``); :meth:`set_epoch` before each training epoch."""

    #: whether the engine gathers batches with :meth:`get_batch` (else ``__getitem__`` and :meth:`collate`)
    batched: ClassVar[bool] = False

    def get_batch(self, indices: Sequence[int]) -> Any:
        """The batch of the samples ``indices``, gathered at once (datasets with ``batched = True``)."""
        raise NotImplementedError(f"{type(self).__name__} is not batched: it serves samples through __getitem__")

    def collate(self, items: list[Any]) -> Any:
        """One batch from ``__getitem__`` items; the default is torch's ``default_collate``."""
        return torch.utils.data.default_collate(items)

    def set_epoch(self, epoch: int) -> None:
        """Per-epoch random choices (a function of ``epoch``, so a resume repeats them); the default: none."""


class Predictor:
    """One-call inference with a trained model, apart from training code.

    ``kind`` tells a caller (``groundkit predict``, the web page) which call the predictor answers:

    - ``"image_text"``: :meth:`ground` (an image and expressions -> boxes in original pixels);
    - ``"video_text"``: :meth:`ground_video` (frames and one expression -> a box per frame);
    - ``"text_video"``: :meth:`search` (a text -> ranked videos of an indexed collection);
    - ``"regions_text"``: :meth:`ground_regions` (precomputed region features and phrases -> ranked boxes).
    """

    kind: ClassVar[str] = ""
    method: ClassVar[str] = ""

    def ground(self, image: Any, texts: list[str]) -> list[dict[str, Any]]:
        """Per text: ``{"text", "box": [x1, y1, x2, y2], "score"}`` in the image's pixels."""
        raise NotImplementedError(f"{type(self).__name__} does not ground images")

    def ground_video(self, frames: list[Any], text: str) -> dict[str, Any]:
        """``{"text", "boxes": [[x1, y1, x2, y2] per frame], "scores": [...]}``."""
        raise NotImplementedError(f"{type(self).__name__} does not ground videos")

    def search(self, text: str, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` best videos for ``text``: ``[(video id, score)]``, best first."""
        raise NotImplementedError(f"{type(self).__name__} does not search videos")

    def ground_regions(self, regions: Any, phrases: list[str], top_k: int = 5) -> list[dict[str, Any]]:
        """Per phrase: ``{"phrase", "boxes", "scores"}`` ranked over the given proposals."""
        raise NotImplementedError(f"{type(self).__name__} does not rank region proposals")

    def video_files(self) -> str | None:
        """A ``text_video`` predictor's folder of the indexed videos' files (``<id>.mp4`` ...) or frames
        (``<id>/*.jpg``), when it knows one; the web page shows frames from it. None: unknown."""
        return None

    def video_captions(self, video_id: str) -> list[str]:
        """The captions a ``text_video`` predictor holds for an indexed video; the default: none."""
        return []


@dataclass
class Figure:
    """A picture for the demo's HTML report: ``file`` relative to the folder it was written in."""

    file: str
    caption: str


class Method:
    """Base class of every method. Subclasses set the class attributes and override the hooks."""

    #: registry name, also the ``method:`` key of a run's config.yaml
    name: ClassVar[str] = ""
    #: the method's typed config (an :class:`~groundkit.config.ExperimentConfig` subclass)
    config_class: ClassVar[type[ExperimentConfig]] = ExperimentConfig
    #: shipped config used when the command line names none (a file in the method's ``configs/``)
    default_config: ClassVar[str] = ""
    #: one line for ``groundkit --help`` and the web page
    summary: ClassVar[str] = ""
    #: the built-in world task this method trains on when its config sets ``world.size``
    #: (see :func:`groundkit.world.resolve_world`); "" if none
    world_task: ClassVar[str] = ""
    #: units of the rates :meth:`evaluate` returns (recall, accuracy ...): groundkit's convention is
    #: ``"percent"`` (counts and ranks as they are); a method still on ``"fraction"`` says so here, and
    #: ``metrics.json`` and ``run.json`` record it
    units: ClassVar[str] = "percent"
    #: extra subcommands: ``{"data" | "bench" | "predict" | "top": {command: "module:register_function"}}``
    #: ("top": a top-level command such as ``groundkit curriculum``);
    #: ``register_function(subparsers)`` adds one parser and sets ``func``. Imported lazily.
    commands: ClassVar[dict[str, dict[str, str]]] = {}

    # ------------------------------------------------------------------ construction (required)

    def build_model(self, cfg: Any) -> nn.Module:
        raise NotImplementedError

    def build_dataset(self, cfg: Any, split: str) -> Any:
        """A :class:`GroundingDataset` (``__len__`` and ``get_batch(indices)`` when ``batched``, else
        ``__getitem__`` and ``collate``; ``set_epoch(epoch)`` for per-epoch random choices).
        None when the config names no data for ``split``."""
        raise NotImplementedError

    def has_split(self, cfg: Any, split: str) -> bool:
        """Whether ``split`` exists for this config (the engine skips a final split that does not)."""
        return True

    def own_data(self, cfg: Any) -> bool:
        """Whether the config names data files of its own, so that the built-in world its ``world.size``
        names is neither built nor used (:func:`groundkit.world.resolve_world`). The default: never."""
        return False

    def use_world(self, cfg: Any, root: Path) -> None:
        """Fill the config's empty data paths from the built-in world built at ``root`` (after
        :func:`groundkit.world.resolve_world` set ``data.root``). The default: nothing (the method reads
        ``data.root`` itself)."""

    def resolve_config(self, cfg: Any) -> Any:
        """The config as it will really run (e.g. a switch that cannot take effect turned off), so that
        ``config.yaml`` never records what did not happen. Called by the engine on its own copy; must be
        idempotent. The default returns ``cfg`` unchanged."""
        return cfg

    def data_source(self, cfg: Any, split: str) -> dict[str, Any]:
        """What ``split``'s metrics were computed from (files, folders), recorded in ``metrics.json``.
        The default: the split name and the config's ``data`` section."""
        return {"split": split, **to_dict(cfg.data)}

    # ------------------------------------------------------------------ training

    def on_train_start(self, model: nn.Module, dataset: Any, cfg: Any, device: torch.device) -> None:
        """State that lives beside the model (e.g. features moved to the device, statistics)."""

    def training_step(self, model: nn.Module, batch: Any, step: int, cfg: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """``(loss, logs)`` for one batch."""
        raise NotImplementedError

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, model: nn.Module, dataset: Any, cfg: Any, device: torch.device) -> dict[str, float]:
        """Metrics on ``dataset``. The default runs :meth:`eval_step` over the samples (sharded
        under DDP, every sample once) and hands the gathered outputs to :meth:`compute_metrics`."""
        return evaluate_samples(self, model, dataset, cfg, device)

    def eval_step(self, model: nn.Module, batch: Any, cfg: Any) -> dict[str, Any]:
        """Per-sample outputs of one batch: ``{key: tensor or list with one entry per sample}``."""
        raise NotImplementedError(f"{type(self).__name__} overrides neither evaluate() nor eval_step()")

    def compute_metrics(self, outputs: dict[str, Any], dataset: Any, cfg: Any) -> dict[str, float]:
        """Metrics from the per-sample outputs of every sample, in dataset order."""
        raise NotImplementedError(f"{type(self).__name__} overrides neither evaluate() nor compute_metrics()")

    def format_eval(self, metrics: dict[str, float], split: str) -> str:
        """How ``groundkit eval`` prints the metrics."""
        return f"{split}: {format_metrics(metrics)}"

    # ------------------------------------------------------------------ inference

    def predictor(self, run: str | Path, device: str = "cpu", **options: Any) -> Predictor:
        """A :class:`Predictor` for a trained run directory or checkpoint."""
        raise NotImplementedError(f"method {self.name!r} has no predictor")

    def demo_figures(self, run: str | Path, out_dir: Path, n: int = 4) -> list[Figure]:
        """Pictures of a trained run's predictions for the demo report (e.g. test images with the predicted
        and true boxes), written as PNG files into ``out_dir``. The default draws none."""
        return []

    # ------------------------------------------------------------------ command line

    def add_cli_args(self, parser: argparse.ArgumentParser, mode: str) -> None:
        """The method's own flags for ``groundkit train|eval METHOD`` (shown in ``--help``);
        ``mode`` is ``"train"`` or ``"eval"``. Flags default to None (= not given)."""

    def cli_overrides(self, args: dict[str, Any], mode: str) -> dict[str, Any]:
        """Config overrides (``{"data.x": value}``) from the method's flags that were given."""
        return {}

    def __repr__(self) -> str:
        return f"<method {self.name}>"
