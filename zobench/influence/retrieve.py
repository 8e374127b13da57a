"""Score a query's sketch against every cached sketch, and explain a top example token by token.

The scan reads the [N, K] float16 store in row blocks and does one matrix product per block for all
queries at once: the cost is one pass over the store's bytes, whatever the number of queries. Scores:
``dot`` (the sketched gradient inner product, RapidIn's influence) or ``cosine`` (each row divided by
its norm, so examples with large gradients do not win by size alone).
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from zobench.errors import UserError
from zobench.files import atomic_write
from zobench.influence.session import Session
from zobench.influence.store import SketchStore

METRICS = ("dot", "cosine")
HALF_QUERIES = 8        # up to this many queries: float16 matrix-vector products, one per query
BLOCK_BYTES = 64 << 20  # rows per block: ~64 MiB of float16, so a block's float32 copy stays small


@dataclass
class Scan:
    scores: np.ndarray      # [Q, N] float32
    seconds: float
    bytes_read: int

    def top(self, k: int) -> np.ndarray:
        """[Q, k] row indices, best first."""
        k = min(k, self.scores.shape[1])
        idx = np.argpartition(-self.scores, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(self.scores, idx, axis=1).argsort(axis=1)[:, ::-1]
        return np.take_along_axis(idx, order, axis=1)


def scan(store: SketchStore, queries: torch.Tensor, metric: str = "cosine") -> Scan:
    """Scores of ``queries`` [Q, K] against all ``store.n`` cached sketches."""
    if metric not in METRICS:
        raise UserError(f"influence: metric '{metric}': expected one of {', '.join(METRICS)}")
    if queries.shape[-1] != store.k:
        raise UserError(f"influence: the query sketch has K={queries.shape[-1]}, the cache K={store.k}")
    if not store.complete:
        raise UserError(f"{store.path}: the cache is incomplete ({len(store.missing())} of {store.n} rows "
                        f"missing); run `zobench influence cache` again to finish it")
    q = queries.float().reshape(-1, store.k)
    if metric == "cosine":
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-30)
    # A few queries run as float16 matrix-vector products on the stored rows: upcasting each block to
    # float32 dominated a scan. Many queries at once upcast and use one float32 matrix product instead,
    # since a float16 product with many columns is slow on CPUs (results/bench/measurements.md).
    half = q.shape[0] <= HALF_QUERIES
    qt = q.T.contiguous().half() if half else q.T.contiguous()
    out = np.empty((q.shape[0], store.n), dtype=np.float32)
    start = time.perf_counter()
    norms = row_norms(store) if metric == "cosine" else None
    for lo, block in _blocks(store):
        if half:
            s = torch.stack([torch.mv(block, qt[:, j]) for j in range(qt.shape[1])], dim=1).float()
        else:
            s = block.float() @ qt
        if norms is not None:
            s /= torch.from_numpy(norms[lo:lo + block.shape[0]]).clamp_min(1e-30)[:, None]
        out[:, lo:lo + block.shape[0]] = s.T.numpy()
    return Scan(out, time.perf_counter() - start, store.n * store.k * 2)


def _blocks(store: SketchStore):
    """(first row, float16 tensor copy of the next ~BLOCK_BYTES of rows) over the whole memmap."""
    matrix = store.matrix()
    rows = max(1, BLOCK_BYTES // (2 * store.k))
    for lo in range(0, store.n, rows):
        yield lo, torch.from_numpy(np.array(matrix[lo:lo + rows]))


def _npy_bytes(n: int) -> int:
    """The size of the .npy file ``np.save`` writes for ``n`` float32 values: the only size read back."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (n,)})
    return buf.tell() + 4 * n


def row_norms(store: SketchStore) -> np.ndarray:
    """The rows' L2 norms (float32), computed once per complete store and kept beside it when the
    directory is writable (a cosine scan then reads the rows once, not twice)."""
    path = Path(store.path) / "row_norms.f32.npy"
    if path.is_file() and path.stat().st_size == _npy_bytes(store.n):
        try:  # never unpickle: a file in a cache directory is data, not code
            with open(path, "rb") as f:  # the header first: it may claim any shape (a 373 GiB allocation)
                ok = np.lib.format.read_magic(f) == (1, 0)  # what np.save writes for a float32 vector
                if ok:
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                    ok = shape == (store.n,) and dtype == np.dtype("<f4") and not fortran
                norms = np.fromfile(f, dtype="<f4", count=store.n) if ok else None
        except (ValueError, OSError):
            norms = None  # not a plain float array (or unreadable): recompute it
        if norms is not None and norms.shape == (store.n,) and np.isfinite(norms).all() and (norms >= 0).all():
            return norms
    norms = np.concatenate([torch.linalg.vector_norm(block, dim=1, dtype=torch.float32).numpy()
                            for _, block in _blocks(store)])
    buf = io.BytesIO()
    np.save(buf, norms)
    try:
        atomic_write(path, buf.getvalue(), "row norms")
    except UserError:
        pass  # a read-only cache or a full disk: nothing half-written; recompute next time
    return norms


def query_sketch(session: Session, prompt_example: dict, generation: str,
                 words: list[str] | None = None) -> tuple[torch.Tensor, dict]:
    """The sketch of the query's response loss, over all generated tokens or only those of ``words``.

    ``prompt_example`` is an Alpaca-style dict (instruction, input); ``generation`` the model's answer.
    Returns (sketch [K], info with the tokens the loss was restricted to).
    """
    enc = session.encode_query(prompt_example, generation)
    weights, info = None, {"tokens": "all"}
    if words:
        pos = token_positions(session.tokenizer, enc["input_ids"], enc["response_start"], words)
        if not pos:
            raise UserError(f"influence: none of the tokens {words} occur in the generation")
        weights = torch.zeros(1, enc["input_ids"].numel())
        weights[0, pos] = 1.0
        info = {"tokens": [session.tokenizer.decode(enc["input_ids"][p]) for p in pos], "positions": pos}
    sk, loss = session.sketch(enc, weights)
    info["loss"] = loss
    return sk, info


def token_contributions(session: Session, example: dict, query: torch.Tensor,
                        metric: str = "cosine") -> list[tuple[str, float]]:
    """Each response token of a training example, with the score of its own loss's gradient sketch
    against the query: the tokens that carry the example's influence. One backward per token."""
    enc = session.encode(example)
    ids = enc["input_ids"]
    q = query.float()
    if metric == "cosine":
        q = q / q.norm().clamp_min(1e-30)
    out = []
    for pos in range(enc["response_start"], ids.numel()):
        weights = torch.zeros(1, ids.numel())
        weights[0, pos] = 1.0
        sk, _ = session.sketch(enc, weights)
        score = float(sk @ q)
        if metric == "cosine":
            score /= float(sk.norm().clamp_min(1e-30))
        out.append((session.tokenizer.decode(ids[pos]), score))
    return out


def token_positions(tokenizer, input_ids: torch.Tensor, response_start: int, words: list[str]) -> list[int]:
    """Positions (indices into ``input_ids``) of the response tokens that overlap an occurrence of any of
    ``words`` (case-sensitive substring match) in the decoded response.

    Token t's character span is the growth of the decoded prefix from t-1 to t. Decoding prefixes, not
    tokens one by one, keeps the spans right for byte-level tokens that split a character, and needs no
    offsets (the response may have been truncated or generated, so there is no source string to map).
    Special tokens (eos) decode to nothing and never match.
    """
    ids = [int(t) for t in input_ids[response_start:]]
    ends = [len(tokenizer.decode(ids[:k + 1], skip_special_tokens=True)) for k in range(len(ids))]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    hits = []
    for word in words:
        at = text.find(word) if word else -1
        while at >= 0:
            hits.append((at, at + len(word)))
            at = text.find(word, at + 1)
    out = []
    for k, end in enumerate(ends):
        begin = ends[k - 1] if k else 0
        if end > begin and any(begin < stop and end > start for start, stop in hits):
            out.append(response_start + k)
    return out
