"""quzo: ZO fine-tuning of the low-bit codes themselves (QuZO, Zhou et al., EMNLP 2025, arXiv 2502.12346).

The forwards run on the quantized weights, and what is trained is their codes: the scales (int8's row SCB,
4-bit's block absmax) stay as quantized. A step, with u = z(seed) the engine's direction:

    W+ = Q1(W + eps u),  W- = Q1'(W - eps u)      the two forwards (W the weights the codes stand for)
    g  = (L(W+) - L(W-)) / (2 eps)
    W  <- Q2(W - lr g u)                           the update, onto the grid again

Q1 and Q2 are stochastic roundings onto the layer's grid (``zo.rounding``), with noise streams independent
of each other and of u: E[Q(x)] = x, so the perturbation and the update are unbiased, and the estimate's
expectation is MeZO's. This is the storage-level form of QuZO: the weights never leave their low-bit codes,
and what is rounded is the perturbed and the updated weight, onto the weight's own grid. The paper's two
conditionally independent quantizations are of the direction u (the authors' public scripts quantize u to
4 bits and add eps * Q(u) to float weights that each forward fake-quantizes): a float copy of the model,
which is what a quantized model is meant to save. The price of this form is noise: a perturbation below a
level's gap moves a code with probability eps over the gap (SmolLM2's NF4 codes at eps 1e-3: 2.2% of them;
``perturb_frac_changed`` in a record), and the two forwards differ by that rounding as well as by eps u.
Q1' is Q1 with the antithetic noise 1 - r: on a uniform grid W- is then exactly
W - (W+ - W), the paper's symmetric pair. Perturbation and update are in weight units, so ``eps`` and ``lr``
mean what they mean for MeZO; a move below one level happens with the probability that keeps it unbiased.
``rounding: nearest`` rounds to the nearest level instead (the biased baseline: moves below half a level
vanish). Every noise value comes from Philox keyed by a seed and the value's index: a run replays from its
trajectory like MeZO's.

Restoring W after the two forwards:

    int8   the grid is uniform, so a perturbation is a whole number of steps d that does not depend on the
           code: restoring subtracts d, its fraction redrawn from the seed and its rounding from one bit per
           value kept by the perturbation (whether d rounded up: the restore draws no noise, and an eighth
           of a byte per weight is held during the forwards). A code that +d or -d would push out of
           [-127, 127] (a row's absmax code always sits at the edge) is left unperturbed, and the positions
           of those few are kept until the restore.
    4-bit  NF4 / FP4 levels are not evenly spaced, and two codes can round to the same perturbed code, so
           the perturbed codes alone do not determine the base. A perturbation moves a value at most one
           level, in the direction of its delta (whose sign comes back from the seed), and keeps one bit per
           value, set where the value moved: the restore moves those values one level back, to exactly
           their codes (an eighth of a byte per weight held during the two forwards, where a copy of the
           packed codes would hold half a byte). A value whose target lies past the next level (a block of
           tiny absmax: more than a level per eps; none in SmolLM2 at eps 1e-3, whose smallest NF4 block
           absmax, 0.048, makes eps 0.021 of the unit against a smallest gap of 0.08) moves to that level,
           its perturbation clipped; one whose code is not its level's own (FP4's -0) is left
           unperturbed, as int8's edge codes are. The update moves every value as far as it must.

On a CPU the passes run in the C library (``zo_grid4`` and ``zo_int8`` in zo/kernels/zo_pass.c, through
``zo.fused``): one pass over a layer's codes, z and the noise drawn in it, the pending perturbation's
restore done in the pass that follows it; elsewhere the chunked torch code here runs, with the same numbers
(tested bit for bit).

``price`` holds what each keeps. The artifact is the codes that changed (``changed_codes``: positions and
new codes against the codes at the start, which wait in an anonymous file on disk when the run saves).
"""

from __future__ import annotations

import tempfile

import torch

from zobench.errors import UserError
from zobench.methods.base import Method, Price, PriceInputs, register
from zobench.methods.common import zo_stepper
from zobench.quant.codes import INT8_MAX, CodeLayer, block_absmax, code_layers, decode, row_scales
from zobench.zo import fused
from zobench.zo.bits import get_bits, put_bits, within
from zobench.zo.raw_io import read_raw, write_raw
from zobench.zo.rounding import noise_seed, round_offset, round_to_levels, steps, uniform
from zobench.zo.sizes import PHILOX_CHUNK
from zobench.zo.trainable import Trainable

CHUNK = PHILOX_CHUNK  # values per pass step: temporaries stay bounded (``TEMP_BYTES`` each)
# Values per call of the C library's int8 pass (whole layers, several a call: each call costs ~50 us of Python
# and OpenMP start-up, and a call a layer made 420 a SmolLM2 step); its temporary is a bit a value (2 MiB).
C_VALUES = 1 << 24
TEMP_BYTES = 96       # bytes of temporaries per value of a chunk (z, noise, float64 targets, int64 codes, indices)
SKIPPED_PER_ROW = 2   # int8 codes at the range's edge per row, kept as int64 positions during a step


class CodeTrainable(Trainable):
    """The codes of bitsandbytes layers as QuZO's trainable set (module docstring)."""

    keeps_own_delta = True  # a save keeps the codes that moved (``delta_parts``)
    saves_raw = True        # the best dev step's codes go to a file (``save_raw`` / ``load_raw``)

    def __init__(self, layers: list[CodeLayer], direction: str = "rademacher", rounding: str = "stochastic",
                 noise_shift: int = 0):
        """``noise_shift`` moves every rounding-noise stream to another key (``_noise_seed``): the same
        directions, an independent rounding; a diagnostic's second draw (bench/zo_signal.py), 0 in a run."""
        super().__init__()
        self.layers, self.direction, self.stochastic = layers, direction, rounding == "stochastic"
        self.noise_shift = int(noise_shift)
        self.names = [f"{layer.name}.weight" for layer in layers]
        self.params = [layer.codes for layer in layers]
        sizes = [layer.numel for layer in layers]
        self.numel = sum(sizes)
        self.offsets = [sum(sizes[:k]) for k in range(len(sizes))]  # global index of each layer's first value
        self.grids = [layer.levels() if layer.kind == "4bit" else None for layer in layers]
        self.skipped: list[torch.Tensor | None] = [None] * len(layers)  # int8: positions left unperturbed
        # 4-bit: one bit a value, set where the pending perturbation moved it (held for the run)
        self.moved = [torch.zeros((layer.numel + 7) // 8, dtype=torch.uint8, device=layer.codes.device)
                      if layer.kind == "4bit" else None for layer in layers]
        self.four_bit = {k for k, layer in enumerate(layers) if layer.kind == "4bit"}
        # int8: one bit a value, whether the pending perturbation's step rounded up (its restore needs no noise),
        # value v at bit v + offset % 8 (so that the C passes' tiles, aligned on global indices, own their bytes)
        self.ups = [torch.zeros((layer.numel + off % 8 + 7) // 8, dtype=torch.uint8, device=layer.codes.device)
                    if layer.kind == "int8" else None for layer, off in zip(layers, self.offsets)]
        self.initial = None  # the codes at the start, on disk (``keep_initial``)

    def _chunks(self, skip=(), only=None):
        """(layer number, layer, start, stop, global index of start) over every value, chunk by chunk (the
        layers numbered in ``skip`` left out; only layer ``only`` where given): the torch path's passes."""
        for k, layer in enumerate(self.layers):
            if k in skip or only not in (None, k):
                continue
            for start in range(0, layer.numel, CHUNK):
                yield k, layer, start, min(start + CHUNK, layer.numel), self.offsets[k] + start

    def _noise_seed(self, seed: int, stream: str) -> int:
        return noise_seed(seed + self.noise_shift, stream)

    def _noise(self, seed: int, stream: str, at: int, n: int, device) -> torch.Tensor | None:
        return uniform(self._noise_seed(seed, stream), at, n, device) if self.stochastic else None

    def _z(self, seed: int, at: int, n: int, device) -> torch.Tensor:
        return fused.fill_z(torch.empty(n, device=device), at, self.direction, seed).double()

    def layer_z(self, seed: int, k: int, device="cpu") -> torch.Tensor:
        """The direction z(seed) over layer ``k``'s values (float64, flat, in the codes' value order)."""
        return self._z(seed, self.offsets[k], self.layers[k].numel, device)

    # -- the perturbation and its restore ---------------------------------------------------------------
    def _int8_x(self, layer, start, stop, at, seed, scale) -> torch.Tensor:
        """The perturbation of int8 values ``start`` .. ``stop - 1`` in (fractional) steps (``steps``' bound)."""
        step = layer.scale(start, stop)
        return steps(torch.where(step > 0, scale * self._z(seed, at, stop - start, step.device) / step, 0.0))

    def _int8_steps(self, k, layer, start, stop, at, seed, scale) -> torch.Tensor:
        """The perturbation of int8 values ``start`` .. ``stop - 1`` in whole steps, before the range check;
        whether each rounded up goes to the layer's bits (``self.ups``)."""
        x = self._int8_x(layer, start, stop, at, seed, scale)
        noise = self._noise(seed, "perturb", at, stop - start, x.device)
        d = round_offset(x, noise if noise is None or scale > 0 else 1 - noise)
        put_bits(self.ups[k], start + self.offsets[k] % 8, d != torch.floor(x).long())
        return d

    @torch.no_grad()
    def apply(self, seed: int, scale: float) -> None:
        pending, on_c = self._take_pending()  # int8 layers on the C library restore in the perturbing pass
        skipped: list[list] = [[] for _ in self.layers]
        noise = self._noise_seed(seed, "perturb")
        for k in self.four_bit:  # each restores the pending perturbation in its own pass
            self._move4(k, [(seed, scale)], "perturb", noise, antithetic=scale < 0, pending=pending)
        if on_c:
            kept = self._c_int8(on_c, [(seed, scale)], "perturb", noise, antithetic=scale < 0, pending=pending)
            for k in on_c:
                skipped[k].append(kept[k])
        for k, layer, start, stop, at in self._chunks(skip=self.four_bit | on_c):
            if layer.kind == "int8":
                codes = layer.read(start, stop)
                d = self._int8_steps(k, layer, start, stop, at, seed, scale)
                keep = ((codes + d).abs() > INT8_MAX) | ((codes - d).abs() > INT8_MAX)
                layer.write(start, stop, codes + d.masked_fill_(keep, 0))
                skipped[k].append(keep.nonzero().view(-1) + start)
        self.skipped = [torch.cat(s) if s else None for s in skipped]
        self._seed, self._scale = seed, scale

    def _on_c(self) -> set[int]:
        """The int8 layers the C library runs (``fused.c_ready``)."""
        return {k for k, layer in enumerate(self.layers) if layer.kind == "int8" and fused.c_ready(layer.codes)}

    def _take_pending(self, on_c: set[int] | None = None) -> tuple[tuple | None, set]:
        """Before a pass that moves every code: the pending perturbation (seed, signed eps, its skipped
        positions per layer), or None, and the int8 layers the C library runs (they restore it in that pass,
        ``fused.c_int8``'s ``restore``); the 4-bit layers restore it in their own pass too (``_move4``), every
        other layer is restored here. ``on_c``: ``_on_c()`` where the caller has it."""
        on_c = self._on_c() if on_c is None else on_c
        pending = (self._seed, self._scale, self.skipped) if self._seed is not None else None
        self.restore(leave=on_c | self.four_bit)
        self._seed, self._scale = None, 0.0
        return pending, on_c

    @torch.no_grad()
    def restore(self, leave=()) -> None:
        """Take the pending perturbation back (the int8 layers numbered in ``leave`` excepted: their caller
        restores them in its own pass)."""
        if self._seed is None:
            return
        for k in self.four_bit - set(leave):
            self._move4(k, [(self._seed, self._scale)], "restore", None)
        skip = self.four_bit | set(leave)
        on_c = self._on_c() - skip if len(skip) < len(self.layers) else set()
        if on_c:
            self._c_int8(on_c, [(self._seed, self._scale)], "restore", None, kept_at=self.skipped)
        for k, layer, start, stop, at in self._chunks(skip=skip | on_c):
            mine = within(self.skipped[k], start, stop)
            # the step the perturbation took: its floor, and up one where its bit says it rounded up
            x = self._int8_x(layer, start, stop, at, self._seed, self._scale)
            d = torch.floor(x).long() + get_bits(self.ups[k], start + self.offsets[k] % 8, stop - start).long()
            layer.write(start, stop, layer.read(start, stop) - d.index_fill_(0, mine, 0))
        self.skipped = [None] * len(self.layers)
        self._seed, self._scale = None, 0.0

    def _move4(self, k, terms, mode, seed_of_noise, antithetic=False, update=None, pending=None, then=None) -> None:
        """4-bit layer ``k``'s pass (``mode``: perturb, restore or update), the ``pending`` perturbation (from
        ``_take_pending``) taken back first: on the C library where it runs (``fused.c_grid4``, one pass, no
        temporaries), else chunk by chunk with torch (the same numbers). ``update``: (lr, lr x weight decay
        or None); ``then``: an update's following perturbation (seed, signed eps, noise seed; ``fold_step``),
        in the same pass on the C library, else a pass of its own after the update."""
        layer, qs = self.layers[k], self.layers[k].weight.quant_state
        lr, decay_coef = update if update is not None else (0.0, None)
        if fused.c_grid4(layer.codes.view(-1), layer.numel, self.offsets[k], block_absmax(qs).contiguous(),
                         qs.blocksize, self.grids[k], self.direction, terms, mode, self.moved[k], lr=lr,
                         decay_coef=decay_coef, noise_seed=seed_of_noise if self.stochastic else None,
                         antithetic=antithetic, restore=pending[:2] if pending is not None else None, then=then):
            return
        if then is not None:
            self._move4(k, terms, mode, seed_of_noise, antithetic, update, pending)
            seed, scale, noise = then
            self._move4(k, [(seed, scale)], "perturb", noise, antithetic=scale < 0)
            return
        if pending is not None:
            self._move4(k, [pending[:2]], "restore", None)
        levels, rank, code_of = self.grids[k]
        for _, _, start, stop, at in self._chunks(only=k):
            codes, n = layer.read(start, stop), stop - start
            if mode == "restore":  # a moved value one level back against its move's sign: its code before
                seed, scale = terms[0]
                up = self._z(seed, at, n, codes.device) * scale > 0
                back = code_of[(rank[codes] - torch.where(up, 1, -1)).clamp_(0, levels.numel() - 1)]
                layer.write(start, stop, torch.where(get_bits(self.moved[k], start, n), back, codes))
                continue
            est = None
            for seed, coef in terms:
                z = self._z(int(seed), at, n, codes.device)
                est = z.mul_(coef) if est is None else est.add_(z, alpha=coef)
            if mode == "update":
                value = levels[rank[codes]] * layer.scale(start, stop)
                est = est.mul_(-lr) - decay_coef * value if decay_coef else est.mul_(-lr)
            noise = uniform(seed_of_noise, at, n, codes.device) if self.stochastic else None
            layer.write(start, stop, self._grid_move(k, layer, codes, start, stop, est, noise, antithetic,
                                                     perturb=mode == "perturb"))

    def _c_int8(self, on_c: set[int], terms, mode, seed_of_noise, antithetic=False, kept_at=None, lr=0.0,
                decay_coef=None, pending=None, then=None) -> list[torch.Tensor | None]:
        """The int8 layers numbered in ``on_c``, whole, on the C library (``fused.c_int8_runs``: the torch path's
        numbers; layers grouped up to ``C_VALUES`` values a call, each call one parallel loop over their tiles),
        the ``pending`` perturbation (``_take_pending``) restored in the same pass. ``kept_at``: each layer's kept
        positions of the perturbation a ``restore`` takes back. Returns each layer's kept positions of the
        perturbation made (``perturb``, or ``then``), None for the layers not in ``on_c``."""
        restore = None
        if pending is not None:
            kept_at, restore = pending[2], pending[:2]
        found: list[list] = [[] for _ in self.layers]
        runs, of, size = [], [], 0  # the call's runs, their layers, and their values

        def run() -> None:
            got = fused.c_int8_runs(runs, self.direction, terms, mode, lr=lr, decay_coef=decay_coef,
                                    noise_seed=seed_of_noise if self.stochastic else None, antithetic=antithetic,
                                    restore=restore, then=then)
            for k, r, positions in zip(of, runs, got):
                found[k].append(positions + r.start)
            runs.clear(), of.clear()

        for k in sorted(on_c):
            layer = self.layers[k]
            codes, scb = layer.codes.view(-1), row_scales(layer.module).contiguous()
            for start in range(0, layer.numel, C_VALUES):
                stop = min(start + C_VALUES, layer.numel)
                at = kept_at[k] if kept_at is not None else None
                if at is not None and (start, stop) != (0, layer.numel):  # a whole layer's are its run's
                    at = within(at, start, stop)
                if size + stop - start > C_VALUES:
                    run()
                    size = 0
                runs.append(fused.Int8Run(codes, start, stop, layer.shape[1], self.offsets[k], scb, self.ups[k], at))
                of.append(k)
                size += stop - start
        if runs:
            run()
        return [torch.cat(f) if f else None for f in found]

    def _grid_move(self, k, layer, codes, start, stop, delta, noise, antithetic=False, perturb=False) -> torch.Tensor:
        """4-bit codes moved by ``delta`` (weight units) onto the layer's levels; codes whose level does not
        change keep their code (FP4's -0 stays -0). A perturbation (``perturb``) moves a value one level at
        most and sets its bit in ``self.moved[k]`` where it moved (module docstring)."""
        levels, rank, code_of = self.grids[k]
        absmax = layer.scale(start, stop)
        r = rank[codes]
        target = levels[r] + torch.where(absmax > 0, delta / absmax, 0.0)
        if noise is not None and antithetic:
            noise = 1 - noise
        moved = round_to_levels(target, levels, noise)
        if not perturb:
            return torch.where(moved == r, codes, code_of[moved])
        # one level at most: a target past the next level rounds onto it or beyond, so clamping the rounded
        # level clips the target to the next level (and leaves a move within it alone)
        moved = torch.minimum(torch.maximum(moved, (r - 1).clamp(min=0)), (r + 1).clamp(max=levels.numel() - 1))
        go = (code_of[r] == codes) & (moved != r)
        put_bits(self.moved[k], start, go)
        return torch.where(go, code_of[moved], codes)

    # -- the update -------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, grads: list[tuple[int, float]], optimizer, step: int) -> None:
        pending, on_c = self._take_pending()
        lr, decay = optimizer.lr(step), optimizer.weight_decay
        stream = int(grads[0][0])  # the update's rounding noise: its own stream of the step's first seed
        noise = self._noise_seed(stream, "update")
        for k in self.four_bit:
            self._move4(k, grads, "update", noise, update=(lr, lr * decay if decay else None), pending=pending)
        if on_c:
            self._c_int8(on_c, grads, "update", noise, lr=lr,
                         decay_coef=lr * decay if decay else None, pending=pending)
        for k, layer, start, stop, at in self._chunks(skip=self.four_bit | on_c):
            codes = layer.read(start, stop)
            est = None
            for seed, coef in grads:
                z = self._z(int(seed), at, stop - start, codes.device)
                est = z.mul_(coef) if est is None else est.add_(z, alpha=coef)
            unit = layer.scale(start, stop)
            delta = est.mul_(-lr) - (lr * decay) * (codes.double() * unit) if decay else est.mul_(-lr)
            d = round_offset(steps(torch.where(unit > 0, delta / unit, 0.0)),
                             self._noise(stream, "update", at, stop - start, codes.device))
            layer.write(start, stop, (codes + d).clamp_(-INT8_MAX, INT8_MAX))

    @torch.no_grad()
    def fold_step(self, grads: list[tuple[int, float]], optimizer, step: int, seed: int, scale: float) -> None:
        """``update(grads, optimizer, step)`` then ``apply(seed, scale)`` (the trainer's fold of a step's update
        into the next step's first perturbation): on the C library, one pass over each layer in which every
        tile is perturbed straight after its update while its codes are in cache (``then`` of ``fused.c_grid4``
        and ``fused.c_int8``), where the two calls make two passes over the layer's memory; the same codes.
        Where an int8 layer is not on the C library, the two calls; a 4-bit layer whose C pass cannot run makes
        the two passes itself (``_move4``)."""
        on_c = self._on_c()
        if on_c | self.four_bit != set(range(len(self.layers))):
            self.update(grads, optimizer, step)
            self.apply(seed, scale)
            return
        pending, on_c = self._take_pending(on_c)
        lr, decay = optimizer.lr(step), optimizer.weight_decay
        decay_coef = lr * decay if decay else None
        stream = int(grads[0][0])
        then = (seed, scale, self._noise_seed(seed, "perturb") if self.stochastic else None)
        noise = self._noise_seed(stream, "update")
        for k in self.four_bit:
            self._move4(k, grads, "update", noise, update=(lr, decay_coef), pending=pending, then=then)
        self.skipped = self._c_int8(on_c, grads, "update", noise, lr=lr,
                                    decay_coef=decay_coef, pending=pending, then=then) if on_c else \
            [None] * len(self.layers)
        self._seed, self._scale = seed, scale

    # -- the codes at one step, kept on disk (best dev step), and what changed since the start ------------
    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params)

    @torch.no_grad()
    def save_raw(self, f, rewind: bool = True) -> None:
        """Write every layer's stored codes to ``f`` (raw bytes; weights at rest, never perturbed)."""
        self.restore()
        write_raw(f, self.params, rewind)

    @torch.no_grad()
    def load_raw(self, f, rewind: bool = True) -> None:
        self.restore()
        if rewind:
            f.seek(0)
        for p in self.params:
            read_raw(f, p, "codes")

    def keep_initial(self) -> None:
        """Keep the codes as they are now in an anonymous file (gone with the process): ``changed_codes``
        compares against them."""
        self.initial = tempfile.TemporaryFile(prefix="zobench-quzo-")
        self.save_raw(self.initial)

    def delta_parts(self) -> tuple[str, dict[str, torch.Tensor], dict]:
        return "codes", self.changed_codes(), {}

    @torch.no_grad()
    def changed_codes(self) -> dict[str, torch.Tensor]:
        """Per layer, the flat positions whose code differs from the start (``<name>::index``, int32) and
        their codes now (``<name>::code``: int8 for int8 layers, uint8 for 4-bit)."""
        if self.initial is None:
            raise RuntimeError("changed_codes needs keep_initial() at the start of the run")
        self.restore()
        self.initial.seek(0)
        out = {}
        for name, layer, p in zip(self.names, self.layers, self.params):
            host = torch.empty(p.shape, dtype=p.dtype)
            read_raw(self.initial, host, "codes")
            before = decode(layer.kind, host.view(-1))
            now = layer.read(0, layer.numel).cpu()
            where = (before != now).nonzero().view(-1)
            out[f"{name}::index"] = where.int()
            out[f"{name}::code"] = now[where].to(torch.int8 if layer.kind == "int8" else torch.uint8)
        return out


@register
class QuZO(Method):
    name = "quzo"

    def build_stepper(self, run):
        cfg = run.cfg
        layers = code_layers(run.model)
        if not layers:
            raise UserError(f"method 'quzo' trains int8, nf4 or fp4 codes, and quant '{cfg.quant}' left no "
                            f"bitsandbytes layer in the model")
        trainable = CodeTrainable(layers, cfg.direction, cfg.rounding)
        if cfg.save:
            trainable.keep_initial()
        return zo_stepper(run, trainable)

    def price(self, inputs: PriceInputs) -> Price:
        cfg, arch = inputs.cfg, inputs.arch
        nnz = sum(inputs.scope_sizes)
        held = sum(o * i for o, i in arch.linears) / 8  # a bit a code: where it moved (4-bit), how it rounded (int8)
        if cfg.quant == "int8":  # and the few edge positions per row, between a perturbation and its restore
            held += SKIPPED_PER_ROW * 8 * sum(o for o, _ in arch.linears)
        chunk = min(CHUNK, max(inputs.scope_sizes, default=0))
        return Price(trainable=held, update=chunk * (TEMP_BYTES + 8 * (cfg.q - 1)), nnz=nnz)
