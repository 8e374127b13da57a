"""Predict a cell's peak memory in the train phase from the model's config alone (no weights loaded); the
phases before it (load, mask, quantize) in ``analysis.phase_estimate``.

What is predicted is what ``results.derive`` calls ``peak_mib``: the largest peak RSS of the warmup and
train phases on a CPU, or on CUDA the device memory the driver reports for the cell's process. The peak is
the sum of

    framework    what a cell's process holds whatever the model, measured once on this machine
                 (``zobench.analysis.calibration``; on CUDA the context, libraries and workspaces, measured
                 on a GPU: the estimate's ``calibration`` says where)
    weights      embeddings, norms and head in the model dtype; block linears in that dtype or, with a
                 quant backend, priced by its ``Storage``
    trainable    what the method keeps besides the weights (indices, float32 masters, sparse values,
                 gradients): the method's ``price`` (``zobench.methods``)
    optimizer    momentum / Adam state of the trainable values (the method's price)
    activations  one inference forward (no autograd) of the training batch, at its largest moment, plus
                 what autograd saves for a backward pass (first-order methods)
    update       the perturb/update pass's temporaries (z chunks) beyond the activations: those passes
                 run between forwards, so only the larger of the two counts

Shapes come from the model built on the meta device (``analysis.architecture``), so tied weights, the
``linear`` scope and the head are exactly what ``zobench.zo.masks.scoped_params`` sees. The framework
footprint is read, never measured, here: ``zobench.driver.calibrate`` runs the calibration cell first.

Two deliberate upper bounds: sequences are taken as ``max_length`` long (batches are padded only to
their longest member, often much shorter), and a classification task's options are one token each.
"""

from __future__ import annotations

from zobench.analysis.architecture import Arch, architecture
from zobench.analysis.calibration import framework, host_floor, load_floor
from zobench.analysis.check import Estimate
from zobench.analysis.phase_estimate import host_phases, phase_estimates
from zobench.cell.record import CellRecord
from zobench.cell.run import resolve_device
from zobench.errors import Unsupported, UserError
from zobench.methods import PriceInputs, get_method
from zobench.methods.base import streams
from zobench.models.load import resolve_dtype
from zobench.quant import get_backend
from zobench.quant.sparse import GATHER_LIMIT
from zobench.results import latest_by_cell
from zobench.spec.config import CellConfig
from zobench.spec.matrix import Cell, expand, reference_key
from zobench.spec.pilot import choose
from zobench.spec.suite import Suite
from zobench.tasks import get_task

MIB = 1 << 20
OPTION_TOKENS = 1         # MeZO's verbalizers (" great", "Yes", ...) are one token: one scored position
GENERATION_TOKENS = 16    # scored target tokens of a generation example (a short answer plus "\n")

# How a backend's forward runs a layer, for its transient: "dequant" builds the [out, in] weight in the
# compute dtype for each matmul (bitsandbytes 4-bit for batches > 1, GPTQ/HQQ torch kernels); "int8"
# quantizes the input and accumulates in int32 (LLM.int8). Unknown backends: "dequant" (the larger).
FORWARD_KIND = {"int8": "int8"}


def _storage(quant: str):
    """(the backend's ``Storage`` or None for "none", whether full ZO can perturb its weights)."""
    if quant == "none":
        return None, True
    backend = get_backend(quant)
    if backend.storage is None:
        raise UserError(f"quant '{quant}': the backend describes no storage format to estimate from")
    return backend.storage, backend.perturbable


def _import_mib(quant: str) -> float:
    return 0.0 if quant == "none" else get_backend(quant).import_rss_mib


def _sequences(cfg: CellConfig, batch_size: int, train: bool = True) -> tuple[int, int]:
    """(sequences in a batch of ``batch_size`` examples, scored positions per sequence)."""
    task = get_task(cfg.task)
    if task.kind == "generation":
        return batch_size, min(cfg.max_length, GENERATION_TOKENS)
    if train and not getattr(task, "train_as_classification", True):
        return batch_size, OPTION_TOKENS  # trained as an LM on the correct option only (COPA)
    n = getattr(task, "n_options", None)
    fixed = n is None
    if n is None:
        try:
            n = len(task.options({}))  # the GLUE tasks' options do not depend on the row
        except (KeyError, TypeError, AttributeError, IndexError, ValueError):
            n, fixed = 2, False
    if cfg.shared_prompt and fixed:
        # Fixed options (SST-2's " great"/" terrible", "Yes"/"No"...) are single tokens: one sequence per
        # example, scored at its last position (scoring._shared; rows with longer options fall back).
        return batch_size, OPTION_TOKENS
    return batch_size * int(n), OPTION_TOKENS


def activation_bytes(arch: Arch, seqs: int, scored: int, t: int, db: int, device: str, quant: str,
                     sparse_delta: bool = False, nnz_layer: float = 0) -> float:
    """Peak bytes of one inference forward, as transformers' Llama-style decoder holds its tensors.

    Per token, in the model dtype: the embedding output (held by the model's forward throughout) and the
    block input (held by the loop) stay alive in every block. The attention half adds the normed input,
    q/k/v, the repeat_kv copies of GQA (sdpa with a padding mask repeats k and v), rotary temporaries
    and sdpa's output with its contiguous copy; the MLP half adds the attention residual, the normed input
    and act(gate), up and their product (SwiGLU; fc1 and act(fc1) otherwise). Then the head: logits at
    the scored positions only, upcast to float32, and logsumexp's temporary of that size.
    ``seqs`` sequences of ``t`` tokens, ``scored`` positions of each projected onto the vocabulary.
    """
    tok, n_scored = seqs * t, seqs * scored
    h, inter, a, k = arch.hidden, arch.intermediate, arch.q_width, arch.kv_width
    gqa = 2 * a if k < a else 0
    # A dense-and-sparse layer adds its sparse product into the base layer's output: the output and
    # delta exist at once, one more [tokens, out] tensor than a plain layer (out = I for gate/up/fc1).
    mlp = 4 * h + (3 if arch.gated else 2) * inter + (inter if sparse_delta else 0)
    elems = {"rotary": 3 * h + 4 * a + 2 * k, "sdpa": 3 * h + a + 2 * k + gqa + 2 * a, "mlp": mlp}
    moments = {name: e * tok * db for name, e in elems.items()}
    # RMSNorm/LayerNorm upcast to float32: copy, square and product beside the held block tensors.
    moments["norm"] = tok * h * (3 * db + 8 + 2 * db)
    mask = seqs * t * t  # [S, 1, T, T] bool padding mask, built once per forward
    moments["sdpa"] += mask * db + arch.eager_heads * seqs * t * t * (2 * db + 4)  # float mask; eager scores
    if quant != "none" and arch.linears:
        # A quantized layer's own temporary lives only inside its call: beside the held tensors, the
        # MLP tensors made before it (act(gate) while up runs) and its output. The largest layer.
        if FORWARD_KIND.get(quant, "dequant") == "int8":
            extra = max(tok * (i + 4 * o) for o, i in arch.linears)  # int8 input copy, int32 accumulator
        else:
            extra = max(o * i for o, i in arch.linears) * db  # the dequantized weight
        moments["quant_linear"] = (4 * h + (2 if arch.gated else 1) * inter) * tok * db + extra
    if sparse_delta and device == "cpu" and db != 4:
        # Half precision on a CPU has no CSR kernel: the gather path's two bounded temporaries, while
        # the layer's output and its zero-initialised delta exist.
        moments["sparse_gather"] = (mlp - inter) * tok * db + 2 * min(tok * nnz_layer, GATHER_LIMIT) * db
    # The head: the last hidden state and the logits rows inside the model; after it returns, the
    # float32 logits and logsumexp's one temporary of their size (plus the half-precision logits
    # while they are upcast).
    logits_rows = n_scored if arch.slices_logits else tok
    moments["head"] = max(tok * h * db + logits_rows * arch.vocab * db,
                          n_scored * arch.vocab * (8 + (db if db != 4 else 0)))
    return max(moments.values()) + mask


def device_of(cfg: CellConfig) -> str:
    """The device kind ("cpu" or "cuda") a cell's estimate is for: ``auto`` as it resolves on this machine."""
    if str(cfg.device).startswith("cuda"):
        return "cuda"
    if cfg.device == "cpu":
        return "cpu"
    if cfg.device == "auto":
        return "cuda" if resolve_device("auto").startswith("cuda") else "cpu"
    raise UserError(f"estimate: device '{cfg.device}': expected cpu, cuda or auto")


def _streams(cfg: CellConfig, method, arch: Arch) -> tuple[bool, bool]:
    """(whether the cell streams its model: ``methods.base.streams``, the cell's own rule, and whether it
    needs a mask). A sensitive mask on an architecture ``models.layerwise`` cannot run block by block draws
    the model whole."""
    backend = None if cfg.quant == "none" else get_backend(cfg.quant)
    streamed = arch.streams and streams(cfg, method, backend)
    return streamed and (cfg.method != "sensitive" or arch.layerwise), cfg.method_info.needs_mask


def estimate_cell(cfg: CellConfig) -> dict:
    """Predicted train-phase peak of ``cfg`` in MiB, with its breakdown (see the module docstring), and each
    earlier phase's (``analysis.phase_estimate``) in ``phases``."""
    device = device_of(cfg)
    method = get_method(cfg.method)
    arch = architecture(cfg.model, cfg.model_fallback, cfg.trust_remote_code)
    db = resolve_dtype(cfg.dtype).itemsize
    storage, perturbable = _storage(cfg.quant)
    if not perturbable and not cfg.method_info.quantized:
        # The pipeline records this cell as unsupported (Pipeline.check_supported): nothing to estimate.
        raise Unsupported(f"method '{cfg.method}' on {cfg.quant} weights is unsupported (quantized codes cannot "
                          f"move by eps*z)")
    weights = arch.numel * db if storage is None else \
        arch.other_numel * db + sum(storage.weight_bytes(o, i) for o, i in arch.linears)
    weights += arch.buffer_bytes
    seqs, scored = _sequences(cfg, cfg.batch_size)
    price = method.price(PriceInputs(cfg=cfg, arch=arch, dtype_bytes=db, device=device, storage=storage,
                                     scope_sizes=arch.scopes[cfg.resolved_scope], tokens=seqs * cfg.max_length,
                                     scored_positions=seqs * scored))
    activations = activation_bytes(arch, seqs, scored, cfg.max_length, db, device, cfg.quant,
                                   price.sparse_delta, price.nnz_per_layer)
    evaluation = None  # one evaluation's forward: eval_batch_size examples, or greedy generation and its KV cache
    evaluates = cfg.eval_before or cfg.eval_after or cfg.eval_every
    if evaluates and not arch.source.startswith("random:"):  # (random weights are never evaluated)
        seqs, scored = _sequences(cfg, cfg.eval_batch_size, train=False)
        kv = 2 * arch.layers * seqs * cfg.max_length * arch.kv_width * db if scored > OPTION_TOKENS else 0
        evaluation = kv + activation_bytes(arch, seqs, scored, cfg.max_length, db, device, cfg.quant,
                                           price.sparse_delta, price.nnz_per_layer)
    if cfg.eval_every and evaluation is not None:  # dev evaluations run inside the train phase
        activations = max(activations, evaluation)
    # The framework floor measured on this machine (zobench.analysis.calibration), not a constant.
    floor = framework(device, cfg.quant)  # on a CPU measured with the cell's backend where it can be
    imports = _import_mib(cfg.quant) if device == "cpu" and floor.get("quant", "none") == "none" else 0.0
    breakdown = {
        "framework_mib": floor["framework_mib"] + imports,
        "weights_mib": weights / MIB,
        "trainable_mib": price.trainable / MIB,
        "optimizer_mib": price.optimizer / MIB,
        "activations_mib": (activations + price.saved_activations) / MIB,
        # The perturb/update passes (ZO) and the optimizer step with its gradients (first-order) run when
        # the forward's tensors are gone: only what they need beyond those counts.
        "update_mib": max(0.0, price.update - activations - price.saved_activations) / MIB,
    }
    breakdown = {k: round(v, 3) for k, v in breakdown.items()}
    peak = round(sum(breakdown.values()), 3)
    largest = max((o * i for o, i in arch.linears), default=0)
    transient = 0.0 if cfg.quant == "none" else get_backend(cfg.quant).quantize_transient(largest, db, device)
    streamed, needs_mask = _streams(cfg, method, arch)
    taken = price.nnz if needs_mask and storage is not None else 0  # the values a mask takes out of quantized layers
    # The load and the mask come before the backend is imported or runs: the plain floor (SmolLM2's GPTQ
    # cells loaded at 433 MiB, the plain floor's 422 and not the 499 with gptqmodel's import).
    before = (cfg, arch, db, storage, taken, breakdown["framework_mib"], streamed)
    plain_floor = framework(device)["framework_mib"]
    floors = {"plain_floor_mib": plain_floor, "load_floor_mib": load_floor(device)}  # off a CPU: the plain floor
    phases = dict(phase_estimates(*before, needs_mask, device, transient, **floors), train=peak)
    # A mask read from the cache runs no forward over the checkpoint: priced as no mask at all (a mapped
    # checkpoint's float tensors then stay unread through the quantize phase: phase_estimates), for the reports
    # of cached-mask cells; the phases keep the computed mask's price.
    cached = phase_estimates(*before, False, device, transient, **floors).get("quantize")
    if_cached = {"quantize": cached} if needs_mask and cached is not None and cached != phases["quantize"] else {}
    if evaluation is not None:
        # an evaluation phase (before, after, the best dev step's): the weights and what the method holds, and
        # the evaluation's forward instead of the training step's
        held = ("framework_mib", "weights_mib", "trainable_mib", "optimizer_mib")
        phases["eval"] = round(sum(breakdown[k] for k in held) + evaluation / MIB, 3)
    host = None
    if device == "cuda":  # the host's memory beside the card's, phase by phase (analysis.phase_estimate)
        host = host_phases(cfg, arch, db, streamed, phases, lambda p: host_floor(device, p))
    return {"peak_mib": peak, "breakdown": breakdown, "phases": phases, "cell_peak_mib": max(phases.values()),
            "device": device, **({"host_phases": host} if host is not None else {}),
            **({"phases_if_mask_cached": if_cached} if if_cached else {}),
            "model_numel": arch.numel, "method": cfg.method, "trainable_numel": price.nnz,
            "linear_numel": sum(o * i for o, i in arch.linears), "architecture_from": arch.source,
            "calibration": {k: floor[k] for k in ("source", "key", "why", "measured_at", "quant") if k in floor}}


def record_estimate(cfg: CellConfig | dict) -> dict:
    """What a record carries: ``{"peak_mib", "breakdown"}``, or ``{"error"}`` (never raises)."""
    try:
        if isinstance(cfg, dict):
            cfg = CellConfig.from_dict(cfg, "estimate")
        est = estimate_cell(cfg)
        return {"peak_mib": est["peak_mib"], "breakdown": est["breakdown"], "phases": est["phases"],
                **{k: est[k] for k in ("host_phases", "phases_if_mask_cached") if k in est},
                "calibration": est["calibration"]}
    except Exception as e:  # an estimate is extra information: it must never fail a cell
        first = str(e).splitlines()[0] if str(e) else ""
        return {"error": f"{type(e).__name__}: {first}"[:300]}


def with_chosen_lr(cell: Cell, suite: Suite, records: list[CellRecord]) -> tuple[Cell, bool]:
    """(the suite's cell as ``zobench run`` runs it, whether it waits for its lr pilots): with the lr its
    pilots chose, the id its record has; as declared while they have not all run (an lr changes no memory)."""
    if suite.lr_pilot is None:
        return cell, False
    chosen = choose([cell], suite.lr_pilot, records)[0]
    return (chosen[0], False) if chosen else (cell, True)


def estimate_missing(suite: Suite, records: list[CellRecord]) -> tuple[list[Estimate], list[str]]:
    """Estimates for the suite's cells with no ok measurement, and one line per such cell.

    The line says the cell was estimated, why (no record, or its record's status) and, for a ZO cell,
    its estimate over its forward reference's estimate: shown for reading, not held to ratio budgets.
    """
    cells = [with_chosen_lr(c, suite, records) for c in expand(suite)]
    waiting = {c.cell_id for c, waits in cells if waits}
    cells = [c for c, _ in cells]
    latest = {r.cell_id: r for r in latest_by_cell(records)}
    cache: dict[str, dict | str] = {}

    def estimate(cell) -> dict | str:
        if cell.cell_id not in cache:
            try:
                cache[cell.cell_id] = estimate_cell(cell.config)
            except UserError as e:  # e.g. full ZO on 4-bit weights: the pipeline refuses it too
                cache[cell.cell_id] = str(e)
        return cache[cell.cell_id]

    forward = {reference_key(c.config.to_dict()): c for c in cells if c.config.method_info.family == "reference"}
    out, lines = [], []
    for cell in cells:
        rec = latest.get(cell.cell_id)
        if rec is not None and rec.ok:
            continue
        reason = (str(rec.reason or "").splitlines() or [""])[0][:80] if rec else ""
        why = "no measured record" if rec is None else f"record {rec.status}: {reason}".rstrip(": ")
        if cell.cell_id in waiting:
            why += "; its lr pilots have not all run"
        est = estimate(cell)
        if isinstance(est, str):
            lines.append(f"not estimated: {cell.describe()}: {est}")
            continue
        ratio = ""
        ref = forward.get(reference_key(cell.config.to_dict()))
        if ref is not None and ref.cell_id != cell.cell_id and isinstance(estimate(ref), dict):
            ratio = f", {est['peak_mib'] / estimate(ref)['peak_mib']:.3f}x its forward's estimate"
        out.append(Estimate(cell.cell_id, cell.labels, cell.config.to_dict(), est["device"], est["peak_mib"],
                            est["breakdown"], est.get("calibration", {}), est["phases"]))
        whole = max(est["phases"], key=est["phases"].get)
        lines.append(f"estimated: {cell.describe()}: peak {est['peak_mib']:.0f} MiB on {est['device']}{ratio}, "
                     f"whole cell {est['cell_peak_mib']:.0f} MiB (in {whole}) ({why})")
    return out, lines


def describe(est: dict) -> str:
    """One short line of the main components, for tables."""
    b = est["breakdown"]
    parts = [f"weights {b['weights_mib']:.0f}", f"act {b['activations_mib']:.0f}"]
    for key, name in (("trainable_mib", "trainable"), ("optimizer_mib", "optim"), ("update_mib", "update"),
                      ("framework_mib", "framework")):
        if b[key] >= 0.5:
            parts.append(f"{name} {b[key]:.0f}")
    host = est.get("host_phases")
    if host:  # a GPU cell: the most the machine around the card must hold
        phase = max(host, key=host.get)
        above = host[phase] > host.get("train", host[phase]) + 0.5  # say which phase when not the training's
        parts.append(f"host {host[phase]:.0f}" + (f" in {phase}" if above else ""))
    return ", ".join(parts)


