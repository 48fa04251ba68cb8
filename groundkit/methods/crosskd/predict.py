"""Using a trained CENet: text-to-video and video-to-text search over a feature store.

>>> r = Retriever.from_checkpoint("runs/crosskd/synth_cecap/checkpoints/best", split="test")
>>> r.search("a dog is running on the beach", k=5)        # [(video_id, score), ...]
>>> r.search_video("video0301", k=5)                        # [(caption, video_id, score), ...]

Videos are embedded once and indexed with FAISS. The CE similarity is not a plain inner product
(the mixture-of-experts weights are renormalised over the experts a video *has*), so there is one
inner-product index per expert-availability pattern: within a pattern the renormalisation is the
same for every video, the query vector ``[w_m t_m / sum_{m in p} w_m]_m`` gives exact scores and the
per-pattern top-k lists are merged. Results equal the brute-force similarity exactly.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...formats.collaborative_experts import FeatureError
from ...text import check_expression, tokenize
from .. import find_run_files, load_run
from ..base import Predictor
from .data import RetrievalEvalSet, batch_spec, layout_paths, open_store, register_store
from .extract import text_encoder_for_store
from .model import encode_all, moe_similarity
from .store import ExpertStore

__all__ = ["Retriever", "register_predict"]


class Retriever(Predictor):
    """Search a set of videos (a store split) with free text, or a video's nearest captions."""

    kind = "text_video"
    method = "crosskd"

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: Any,
        store: Any,
        split: str | None = "test",
        device: str | torch.device = "cpu",
        text_encoder: Any = None,
        index: str = "auto",
        batch_size: int = 256,
    ):
        self.model = model.eval().to(device)
        self.cfg, self.store, self.device = cfg, store, torch.device(device)
        self.batch_size = batch_size
        if split:
            ids = store.split(Path(layout_paths(cfg)["splits"].get(split, split)).stem)
        else:
            ids = list(store.video_ids)
        self.dataset = RetrievalEvalSet(store, ids, batch_spec(cfg, store), num_test_captions=10**6)
        self.video_ids = list(ids)
        self.video_emb, self.avail = encode_all(self.model, self.dataset, self.device, batch_size)  # [V, M, d], [V, M]
        self._text_encoder = text_encoder
        self._index_kind = index
        self._build_index()
        self._cap_emb: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        store: Any = None,
        split: str | None = "test",
        device: str = "cpu",
        text_encoder: Any = None,
        index: str = "auto",
    ) -> Retriever:
        """Rebuild the model from a checkpoint directory (or run directory) and index ``split`` of ``store``
        (an :class:`~groundkit.methods.crosskd.store.ExpertStore`, a store path, or None for the training config's)."""
        if store is not None and not isinstance(store, ExpertStore):
            store = ExpertStore(store)
        overrides = {}
        if store is not None:
            register_store(store)
            overrides = {"data.store": str(store.root), "data.root": ""}
        try:
            _, cfg, model = load_run(path, overrides=overrides, method="crosskd")
        except FeatureError as e:
            raise FeatureError(
                f"{find_run_files(path)[0]}: cannot rebuild the model from the run's features ({e}); pass --store"
            ) from None
        if store is None:
            store = open_store(cfg, need_teachers=False)
        return cls(model, cfg, store, split=split, device=device, text_encoder=text_encoder, index=index)

    def _build_index(self) -> None:
        import faiss  # noqa: PLC0415 (heavy, loaded on first use)

        a = self.avail.bool().cpu().numpy()
        V, M, d = self.video_emb.shape
        x = (self.video_emb * self.avail.unsqueeze(-1)).reshape(V, M * d).cpu().numpy().astype(np.float32)
        self.patterns: list[tuple[np.ndarray, np.ndarray, Any]] = []  # (pattern [M] bool, video rows, index)
        keys, inv = np.unique(a, axis=0, return_inverse=True)
        for p, key in enumerate(keys):
            rows = np.nonzero(inv.reshape(-1) == p)[0]
            kind = self._index_kind
            if kind == "auto":
                kind = "hnsw" if len(rows) > 100_000 else "flat"
            if kind == "flat":
                idx = faiss.IndexFlatIP(M * d)
            elif kind == "hnsw":
                idx = faiss.IndexHNSWFlat(M * d, 32, faiss.METRIC_INNER_PRODUCT)
            else:
                raise ValueError(f"index must be auto, flat or hnsw; got {kind!r}")
            idx.add(np.ascontiguousarray(x[rows]))
            self.patterns.append((key.astype(bool), rows, idx))

    def video_files(self) -> str | None:
        """The folder the store's features were extracted from (``groundkit data extract-experts
        --videos``), if it is on this machine; a converted release names its archive folder, which
        holds no videos (the page then says there are no frames)."""
        src = self.store.meta.get("info", {}).get("source")
        return str(src) if src and Path(src).is_dir() else None

    # ------------------------------------------------------------------ text side
    @property
    def text_encoder(self) -> Any:
        if self._text_encoder is None:
            self._text_encoder = text_encoder_for_store(self.store, self.cfg.data.text_feat)
        return self._text_encoder

    @torch.no_grad()
    def encode_queries(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Free-text queries -> (per-expert embeddings [Q, M, d], MoE weights [Q, M])."""
        T = self.cfg.data.max_tokens["text"]
        feats = [self.text_encoder.encode_tokens(t)[:T] for t in texts]
        D = self.store.meta["text"][self.cfg.data.text_feat]["dim"]
        x = np.zeros((len(texts), T, D), dtype=np.float32)
        m = np.zeros((len(texts), T), dtype=bool)
        for i, f in enumerate(feats):
            if f.shape[-1] != D:
                raise ValueError(f"text encoder gives {f.shape[-1]}-d tokens, the model was trained on {D}-d")
            x[i, : len(f)] = f
            m[i, : len(f)] = True
        t, w = self.model.encode_text(torch.from_numpy(x).to(self.device), torch.from_numpy(m).to(self.device))
        return t.float(), w.float()

    def unknown_words(self, query: str) -> list[str]:
        """Words of ``query`` the text encoder has no vector for (word-vector encoders; sub-word models know all)."""
        fn = getattr(self.text_encoder, "unknown_words", None)
        return fn(query) if fn is not None else []

    def search(
        self, query: str | Sequence[str], k: int = 10
    ) -> list[tuple[str, float]] | list[list[tuple[str, float]]]:
        """Top-``k`` (video_id, score) for a query (or a list of lists for several queries). A query none of whose
        words the text encoder knows is refused (its ranking would be arbitrary)."""
        single = isinstance(query, str)
        queries = [check_expression(q, "query") for q in ([query] if single else list(query))]
        _check_k(k)
        for q in queries:
            unknown = self.unknown_words(q)
            if unknown and len(unknown) == len(tokenize(q)):
                raise FeatureError(
                    f"query {q!r}: none of its words is known to the text encoder ({', '.join(unknown)})"
                )
        t, w = self.encode_queries(queries)
        res = self.search_embeddings(t, w, k)
        return res[0] if single else res

    def search_embeddings(self, t: torch.Tensor, w: torch.Tensor, k: int = 10) -> list[list[tuple[str, float]]]:
        """Exact top-k over all patterns for query embeddings t [Q, M, d], w [Q, M]."""
        Q, M, d = t.shape
        best_s = np.full((Q, 0), -np.inf, dtype=np.float32)
        best_i = np.zeros((Q, 0), dtype=np.int64)
        for key, rows, idx in self.patterns:
            pm = torch.as_tensor(key, dtype=t.dtype, device=t.device)
            den = (w * pm).sum(1, keepdim=True).clamp_min(1e-12)
            q = ((w * pm / den).unsqueeze(-1) * t).reshape(Q, M * d).cpu().numpy().astype(np.float32)
            kk = min(k, len(rows))
            s, i = idx.search(np.ascontiguousarray(q), kk)
            best_s = np.concatenate([best_s, s], 1)
            best_i = np.concatenate([best_i, np.where(i >= 0, rows[np.clip(i, 0, None)], -1)], 1)
        order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        return [
            [(self.video_ids[best_i[q, j]], float(best_s[q, j])) for j in order[q] if best_i[q, j] >= 0]
            for q in range(Q)
        ]

    # ------------------------------------------------------------------ video -> text
    @torch.no_grad()
    def _caption_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cap_emb is None:
            groups = [[r] for q in self.dataset.queries for g in q for r in g]
            self._cap_owner = [self.video_ids[i] for i, q in enumerate(self.dataset.queries) for g in q for _ in g]
            self._cap_rows = [g[0] for g in groups]
            ts, ws = [], []
            for s in range(0, len(groups), self.batch_size):
                b = self.dataset.text_batch(groups[s : s + self.batch_size])
                t, w = self.model.encode_text(b["text"].to(self.device), b["text_mask"].to(self.device))
                ts.append(t.half())
                ws.append(w.float())
            self._cap_emb = (torch.cat(ts), torch.cat(ws))
        return self._cap_emb

    def video_captions(self, video_id: str) -> list[str]:
        """The captions the feature store holds for an indexed video (empty when it stores none)."""
        vi = self.store.index.get(video_id)
        return [] if vi is None else self.store.captions(vi)

    @torch.no_grad()
    def search_video(self, video_id: str, k: int = 10) -> list[tuple[str, str, float]]:
        """Top-``k`` captions of the indexed videos for a video: (caption text, its video id, score)."""
        _check_k(k)
        if video_id not in self.video_ids:
            some = ", ".join(self.video_ids[:3])
            raise FeatureError(
                f"video id {video_id!r} is not among the {len(self.video_ids)} indexed videos (e.g. {some})"
            )
        j = self.video_ids.index(video_id)
        t, w = self._caption_embeddings()
        scores = []
        for s in range(0, len(t), 8192):
            scores.append(
                moe_similarity(
                    t[s : s + 8192].float(), w[s : s + 8192], self.video_emb[j : j + 1], self.avail[j : j + 1]
                )[:, 0]
            )
        sc = torch.cat(scores)
        top = torch.topk(sc, min(k, len(sc))).indices.tolist()
        out = []
        for i in top:
            vid = self._cap_owner[i]
            vi = self.store.index[vid]
            caps = self.store.captions(vi)
            local = self._cap_rows[i] - int(self.store.caption_rows(self.cfg.data.text_feat, np.array([vi]))[0][0])
            text = caps[local] if 0 <= local < len(caps) else f"<caption {local} of {vid}>"
            out.append((text, vid, float(sc[i])))
        return out


def _check_k(k: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise FeatureError(f"k (the number of results) must be a whole number >= 1, got {k!r}")


# ----------------------------------------------------------------------------- CLI


def register_predict(subparsers: Any) -> None:
    p = subparsers.add_parser("retrieval", help="text-to-video (or video-to-text) search with a trained CENet")
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint directory (e.g. <run>/checkpoints/best) or run directory"
    )
    p.add_argument("--query", action="append", default=[], help="text query (repeatable)")
    p.add_argument("--video-id", action="append", default=[], help="video id for video-to-text search (repeatable)")
    p.add_argument("--store", default=None, help="feature store to search (default: the training config's)")
    p.add_argument("--split", default="test", help="which split's videos to search ('' for the whole store)")
    p.add_argument("-k", "--top-k", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    if not args.query and not args.video_id:
        raise FeatureError("predict retrieval: give --query and/or --video-id")
    r = Retriever.from_checkpoint(args.checkpoint, store=args.store, split=args.split or None, device=args.device)
    out: dict[str, Any] = {"t2v": {}, "v2t": {}}
    for q in args.query:
        out["t2v"][q] = [{"video_id": v, "score": s} for v, s in r.search(q, k=args.top_k)]
        unknown = r.unknown_words(q)
        if unknown:
            out.setdefault("unknown_words", {})[q] = unknown
            print(f"groundkit: note: {q!r}: words the model does not know: {', '.join(unknown)}", file=sys.stderr)
    for v in args.video_id:
        out["v2t"][v] = [{"caption": c, "video_id": vid, "score": s} for c, vid, s in r.search_video(v, k=args.top_k)]
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    for q, hits in out["t2v"].items():
        print(f"query: {q}")
        for rank, h in enumerate(hits, 1):
            print(f"  {rank:3d}. {h['video_id']}  {h['score']:.4f}")
    for v, hits in out["v2t"].items():
        print(f"video: {v}")
        for rank, h in enumerate(hits, 1):
            print(f"  {rank:3d}. {h['score']:.4f}  [{h['video_id']}] {h['caption']}")
    return 0
