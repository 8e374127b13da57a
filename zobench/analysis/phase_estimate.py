"""Predict the peak of the phases before training (load, mask, quantize) from the model's config alone.

``analysis.estimate`` prices the training phases; a cell's whole peak can be earlier: a float model loaded
whole before it is quantized, or the squared gradients of its mask. Each phase here is the framework floor
plus what is alive at that phase's largest moment, in the order the pipeline builds it (``cell.pipeline``):

    load       streamed (a random model whose block linears wait on the meta device, ``Pipeline.streams``):
               the tensors that stay float; otherwise the whole float model. On a CPU a safetensors
               checkpoint loaded in its own dtype is mapped, not read (``Arch.mapped_dtype``): the load
               holds its buffers only, and the pages come in with the phase that first reads them
    mask       random / magnitude: the loaded weights and the chosen indices (a mapped checkpoint: what
               each reads, nothing / the weights in scope). Gradient masks (sensitive,
               task_grad) on the whole model: the float weights, a float32 accumulator per weight in scope,
               what autograd saves for the backward of one calibration sequence, and the head's logits
               with their gradient. Block by block (``models.layerwise``): the tensors that stay float,
               every block's kept input for every calibration sequence (on a GPU in host memory: one
               sequence's on the device), and one block's float weights,
               gradients, float32 accumulators and saved activations, plus the running top-k
               (a float cell then makes its block linears: the float model, the mask beside it)
    quantize   streamed: the quantized layers, one float layer at a time and the taken sparse values;
               otherwise the float model (still held) beside the whole quantized model, and on a CPU
               the owning copy of the tensors that stay float (``quant.base._detach_from_checkpoint``:
               made while a checkpoint's mapped pages are still resident)

On a GPU the phases above are the card's memory; the host's (``host_phases``) is the process's own floor
there (``calibration.host_floor``) plus what the cell keeps in host memory: the mask's
kept block inputs, when it is built block by block.

Saved activations of one Llama-style block for a backward pass, per token: its input and the two norms'
(inputs and outputs), q, k, v and the attention output, and the MLP's gate, up, act(gate) and their product.
"""

from __future__ import annotations

from zobench.zo.sizes import TOPK_CHUNK

MIB = 1 << 20
GRADIENT_MASKS = ("sensitive", "task_grad")  # masks that run forwards and backwards over calibration data


def _saved_per_token(arch) -> int:
    """Values autograd keeps per token for one block's backward (module docstring)."""
    return 4 * arch.hidden + 2 * arch.q_width + 2 * arch.kv_width + 4 * arch.intermediate


def _head_bytes(arch, tokens: int) -> int:
    """The loss's logits over the vocabulary in float32, their log-softmax and its gradient."""
    return 3 * tokens * arch.vocab * 4


def _running_topk_bytes(k: int, scope: int, largest: int, device: str = "cpu") -> int:
    """The global top-k's largest moment (``zo.masks.topk_mask``): a merge of the k best so far with the
    candidates waiting (at most half of max(k, TOPK_CHUNK), plus one chunk's), each a float32 value and an int64
    key, concatenated (the parts then freed); alive at once: the concatenation, the selection's copy of the
    values with int64 positions (12 bytes each), its boolean keep mask, and the k kept. On a GPU the k-th
    largest comes from an unsorted topk (``zo.masks._kth_largest``): its k values and int64 positions too
    (bench/topk_memory.py on a CPU, both ways: +71 MiB at the 7B's k)."""
    merged = min(scope, k + max(k, TOPK_CHUNK) // 2 + min(TOPK_CHUNK, largest))
    return 25 * merged + 12 * k + (12 * k if device == "cuda" else 0)


def _kept_inputs_bytes(cfg, arch, db: int) -> int:
    """A block-by-block mask's kept inputs: each of the ``layers`` blocks' and the final norm's, for every
    calibration sequence."""
    return (arch.layers + 1) * cfg.calib_sequences * cfg.calib_length * arch.hidden * db


def mask_bytes(cfg, arch, db: int, streamed: bool, device: str = "cpu", mapped: bool = False) -> float:
    """Bytes alive at the mask phase's largest moment, beyond the framework floor, on ``device`` (a GPU cell
    keeps its block inputs in host memory: not counted there). ``mapped``: a checkpoint's mapped tensors,
    resident only once read: a random mask reads none, a magnitude mask its scope's."""
    scope = sum(arch.scopes[cfg.resolved_scope])
    k = int(round(cfg.density * scope))
    float_model = arch.numel * db + arch.buffer_bytes
    other = arch.other_numel * db + arch.buffer_bytes
    chosen = 8 * k  # int64 flat indices
    if cfg.method not in GRADIENT_MASKS:
        if mapped:
            read = scope * db if cfg.method == "magnitude" else 0
            held = arch.buffer_bytes + read
        else:
            held = other if streamed else float_model
        return held + chosen + (8 * 2 * k if cfg.method == "random" else 0)
    tokens = cfg.calib_length if cfg.method == "sensitive" else cfg.batch_size * cfg.max_length
    if not streamed:
        largest = max((o * i for o, i in arch.linears), default=0)
        return (float_model + 4 * scope + arch.layers * _saved_per_token(arch) * tokens * db
                + _head_bytes(arch, tokens) + largest * db + chosen)
    block_linears = sum(o * i for o, i in arch.linears) / max(arch.layers, 1)
    one = cfg.calib_length * arch.hidden * db  # a sequence's block input (or its gradient)
    kept = _kept_inputs_bytes(cfg, arch, db) if device == "cpu" else 2 * one  # all of them, or one at a time
    block = block_linears * (db + db + 4)  # weights, their gradients, the float32 accumulators
    running = _running_topk_bytes(k, scope, max((o * i for o, i in arch.linears), default=0), device)
    return (other + kept + block + _saved_per_token(arch) * cfg.calib_length * db
            + max(0, _head_bytes(arch, cfg.calib_length) - block) + running)


def host_mask_bytes(cfg, arch, db: int, streamed: bool) -> float:
    """Bytes a GPU cell's mask phase keeps in host memory: built block by block (``models.layerwise``),
    every block's input for every calibration sequence waits there for its block's backward (the input of
    each of the ``layers`` blocks and the final norm's); otherwise nothing beyond the floor."""
    if not streamed or cfg.method not in GRADIENT_MASKS:
        return 0.0
    return _kept_inputs_bytes(cfg, arch, db)


def host_phases(cfg, arch, db: int, streamed: bool, phases: dict, floor) -> dict:
    """A GPU cell's host memory (MiB) in each of ``phases``: the floor (``floor(phase)``: the load phase runs
    no forward yet), and the mask's kept inputs."""
    out = {p: floor(p) for p in phases}
    if "mask" in out:
        out["mask"] += host_mask_bytes(cfg, arch, db, streamed) / MIB
    return {k: round(v, 3) for k, v in out.items()}


def quantize_bytes(cfg, arch, db: int, storage, streamed: bool, nnz: int, transient: float = 0.0,
                   mapped: bool = False) -> float:
    """Bytes alive while the last layer is quantized (streamed: it the only float one), with ``transient``, what
    quantizing the largest layer needs beyond it (``Backend.quantize_transient``); ``nnz``: the values a mask
    took out of the quantized layers, kept beside them (0 for a method that trains the codes or scales).
    ``mapped``: the tensors that stay float are a checkpoint's mapped pages, which a streamed quantize phase
    never reads."""
    quantized = sum(storage.weight_bytes(o, i) for o, i in arch.linears)
    other = arch.buffer_bytes if mapped else arch.other_numel * db + arch.buffer_bytes
    sparse = nnz * (db + 4 + 8)  # the taken values, their int32 positions, the mask's int64 indices
    if streamed:
        return other + quantized + max((o * i for o, i in arch.linears), default=0) * db + sparse + transient
    return arch.numel * db + arch.buffer_bytes + quantized + sparse + transient


def phase_estimates(cfg, arch, db: int, storage, nnz: int, floor_mib: float, streamed: bool,
                    needs_mask: bool, device: str = "cpu", transient: float = 0.0,
                    plain_floor_mib: float | None = None, load_floor_mib: float | None = None) -> dict[str, float]:
    """MiB per phase before training: ``{"load", "mask" (mask methods), "quantize" (quantized cells)}``.
    ``plain_floor_mib``: the floor before any backend is imported or has run, where it differs from
    ``floor_mib``: the load's and the mask's, which come before the quantize phase. ``load_floor_mib``: the
    load phase's own, where measured (``calibration.load_floor``), else the plain floor."""
    plain = floor_mib if plain_floor_mib is None else plain_floor_mib
    load_floor = plain if load_floor_mib is None else load_floor_mib
    other = arch.other_numel * db + arch.buffer_bytes
    mapped = device == "cpu" and arch.mapped_dtype == cfg.dtype
    if mapped:
        loaded = arch.buffer_bytes  # the checkpoint's tensors mapped: nothing of them read yet
    else:
        loaded = other if streamed else arch.numel * db + arch.buffer_bytes
    out = {"load": load_floor + loaded / MIB}
    if needs_mask:
        mask = mask_bytes(cfg, arch, db, streamed, device, mapped)
        if streamed and storage is None and not mapped:  # a float cell makes its linears once the mask is taken
            chosen = 8 * cfg.density * sum(arch.scopes[cfg.resolved_scope])  # (mapped: nothing read by that)
            mask = max(mask, arch.numel * db + arch.buffer_bytes + chosen)
        out["mask"] = plain + mask / MIB
    if storage is not None:
        # A gradient mask's forwards read the mapped tensors that stay float (the embeddings, the head): their
        # pages are resident from then on (SmolLM2 nf4: a computed mask's quantize phase 646 MiB, a cached
        # one's 519). These phases price the mask as computed; ``estimate_cell`` prices a cached one beside them
        # by asking again with no mask (``phases_if_mask_cached``).
        unread = mapped and not (needs_mask and cfg.method in GRADIENT_MASKS)
        quantize = quantize_bytes(cfg, arch, db, storage, streamed, nnz, transient, unread)
        if not streamed and device == "cpu":
            quantize += other  # the copy out of the checkpoint's map, beside its still resident pages
        out["quantize"] = floor_mib + quantize / MIB
    return {k: round(v, 3) for k, v in out.items()}
