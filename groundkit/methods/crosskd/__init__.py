"""crosskd: text-video retrieval with cross-modal knowledge distillation (Tran et al., ACCV 2022).

Files: ``config.py`` -> ``store.py`` (released archives -> memory-mapped fp16 store) -> ``data.py``
(batches, store resolution) -> ``model.py`` (CENet, losses) -> ``method.py`` (training step,
evaluation); ``predict.py`` (Retriever: free-text search), ``extract.py`` (features from raw
videos).
"""

from .config import CrossKDConfig, CrossKDData, CrossKDLoss, CrossKDModel
from .data import open_store
from .method import METHOD, CrossKDMethod, encode_all, similarity_matrix

__all__ = [
    "METHOD",
    "CrossKDMethod",
    "CrossKDConfig",
    "CrossKDData",
    "CrossKDModel",
    "CrossKDLoss",
    "open_store",
    "encode_all",
    "similarity_matrix",
]
