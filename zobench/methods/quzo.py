"""quzo: ZO fine-tuning of the low-bit codes themselves (QuZO, Zhou et al., EMNLP 2025, arXiv 2502.12346).

The forwards run on the quantized weights, and what is trained is their codes: the scales (int8's row SCB,
4-bit's block absmax) stay as quantized. A step, with u = z(seed) the engine's direction:

    W+ = Q1(W + eps u),  W- = Q1'(W - eps u)      the two forwards (W the weights the codes stand for)
    g  = (L(W+) - L(W-)) / (2 eps)
    W  <- Q2(W - lr g u)                           the update, onto the grid again

Q1 and Q2 are stochastic roundings onto the layer's grid (``zo.rounding``), with noise streams independent
of each other and of u: E[Q(x)] = x, so the perturbation and the update are unbiased, and the estimate's
expectation is MeZO's (the paper's two conditionally independent quantizations of u, one for the forwards
and one for the update). Q1' is Q1 with the antithetic noise 1 - r: on a uniform grid W- is then exactly
W - (W+ - W), the paper's symmetric pair. Perturbation and update are in weight units, so ``eps`` and ``lr``
mean what they mean for MeZO; a move below one level happens with the probability that keeps it unbiased.
``rounding: nearest`` rounds to the nearest level instead (the biased baseline: moves below half a level
vanish). Every noise value comes from Philox keyed by a seed and the value's index: a run replays from its
trajectory like MeZO's.

Restoring W after the two forwards:

    int8   the grid is uniform, so a perturbation is a whole number of steps d that does not depend on the
           code: restoring subtracts d, redrawn from the seed (no copy). A code that +d or -d would push out
           of [-127, 127] (a row's absmax code always sits at the edge) is left unperturbed, and the
           positions of those few are kept until the restore.
    4-bit  NF4 / FP4 levels are not evenly spaced, and two codes can round to the same perturbed code, so
           the perturbed codes do not determine the base: the packed codes of every layer are copied before
           the perturbation and copied back (half a byte per weight, held during the two forwards).

On a CPU the passes run in the C library (``zo_grid4`` and ``zo_int8`` in zo/kernels/zo_pass.c, through
``zo.fused``): one pass over a layer's codes, z and the noise drawn in it, an int8 restore done in the pass
that follows it; elsewhere the chunked torch code here runs, with the same numbers (tested bit for bit).

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
from zobench.zo.raw_io import read_raw, write_raw
from zobench.zo.rounding import noise_seed, round_offset, round_to_levels, uniform
from zobench.zo.sizes import PHILOX_CHUNK
from zobench.zo.trainable import Trainable

CHUNK = PHILOX_CHUNK  # values per pass step: temporaries stay bounded (``TEMP_BYTES`` each)
TEMP_BYTES = 96       # bytes of temporaries per value of a chunk (z, noise, float64 targets, int64 codes, indices)
SKIPPED_PER_ROW = 2   # int8 codes at the range's edge per row, kept as int64 positions during a step


class CodeTrainable(Trainable):
    """The codes of bitsandbytes layers as QuZO's trainable set (module docstring)."""

    keeps_own_delta = True  # a save keeps the codes that moved (``delta_parts``)
    saves_raw = True        # the best dev step's codes go to a file (``save_raw`` / ``load_raw``)

    def __init__(self, layers: list[CodeLayer], direction: str = "rademacher", rounding: str = "stochastic"):
        super().__init__()
        self.layers, self.direction, self.stochastic = layers, direction, rounding == "stochastic"
        self.names = [f"{layer.name}.weight" for layer in layers]
        self.params = [layer.codes for layer in layers]
        sizes = [layer.numel for layer in layers]
        self.numel = sum(sizes)
        self.offsets = [sum(sizes[:k]) for k in range(len(sizes))]  # global index of each layer's first value
        self.grids = [layer.levels() if layer.kind == "4bit" else None for layer in layers]
        self.skipped: list[torch.Tensor | None] = [None] * len(layers)  # int8: positions left unperturbed
        self.base: list[torch.Tensor] | None = None  # 4-bit: the packed codes before the perturbation
        self.initial = None  # the codes at the start, on disk (``keep_initial``)

    def _chunks(self, skip=()):
        """(layer number, layer, start, stop, global index of start) over every value, chunk by chunk (the
        layers numbered in ``skip`` left out)."""
        for k, layer in enumerate(self.layers):
            if k in skip:
                continue
            for start in range(0, layer.numel, CHUNK):
                yield k, layer, start, min(start + CHUNK, layer.numel), self.offsets[k] + start

    def _noise(self, seed: int, stream: str, at: int, n: int, device) -> torch.Tensor | None:
        return uniform(noise_seed(seed, stream), at, n, device) if self.stochastic else None

    def _z(self, seed: int, at: int, n: int, device) -> torch.Tensor:
        return fused.fill_z(torch.empty(n, device=device), at, self.direction, seed).double()

    # -- the perturbation and its restore ---------------------------------------------------------------
    def _int8_steps(self, layer, start, stop, at, seed, scale) -> torch.Tensor:
        """The perturbation of int8 values ``start`` .. ``stop - 1`` in whole steps, before the range check."""
        step = layer.scale(start, stop)
        x = torch.where(step > 0, scale * self._z(seed, at, stop - start, step.device) / step, 0.0)
        noise = self._noise(seed, "perturb", at, stop - start, step.device)
        return round_offset(x, noise if noise is None or scale > 0 else 1 - noise)

    @torch.no_grad()
    def apply(self, seed: int, scale: float) -> None:
        base = self.base  # copied back into the 4-bit layers now, and still their codes: kept, not copied again
        pending, on_c = self._take_pending()  # int8 layers on the C library restore in the perturbing pass
        if any(layer.kind == "4bit" for layer in self.layers):
            self.base = base or [layer.codes.clone() if layer.kind == "4bit" else None for layer in self.layers]
        skipped: list[list] = [[] for _ in self.layers]
        done = {k for k, layer in enumerate(self.layers) if layer.kind == "4bit" and self._c_move(
            k, layer, [(seed, scale)], noise_seed(seed, "perturb"), antithetic=scale < 0)}
        for k, layer, start, stop, at in self._chunks(skip=done):
            if k in on_c:
                keep = self._c_int8(k, layer, start, stop, [(seed, scale)], "perturb", noise_seed(seed, "perturb"),
                                    antithetic=scale < 0, pending=pending, k_pending=k)
                skipped[k].append(keep.nonzero().view(-1) + start)
            elif layer.kind == "int8":
                codes = layer.read(start, stop)
                d = self._int8_steps(layer, start, stop, at, seed, scale)
                keep = ((codes + d).abs() > INT8_MAX) | ((codes - d).abs() > INT8_MAX)
                layer.write(start, stop, codes + d.masked_fill_(keep, 0))
                skipped[k].append(keep.nonzero().view(-1) + start)
            else:
                codes = layer.read(start, stop)
                moved = self._grid_move(k, layer, codes, start, stop, at, scale * self._z(seed, at, stop - start,
                                        codes.device), self._noise(seed, "perturb", at, stop - start, codes.device),
                                        antithetic=scale < 0)
                layer.write(start, stop, moved)
        self.skipped = [torch.cat(s) if s else None for s in skipped]
        self._seed, self._scale = seed, scale

    def _take_pending(self) -> tuple[tuple | None, set]:
        """Before a pass that moves every code: the pending perturbation (seed, signed eps, its skipped
        positions per layer), or None, and the int8 layers the C library runs (they restore it in that pass,
        ``fused.c_int8``'s ``restore``); every other layer is restored here."""
        on_c = {k for k, layer in enumerate(self.layers) if layer.kind == "int8" and fused.c_ready(layer.codes)}
        pending = (self._seed, self._scale, self.skipped) if self._seed is not None else None
        self.restore(leave=on_c)
        return pending, on_c

    @torch.no_grad()
    def restore(self, leave=()) -> None:
        """Take the pending perturbation back (the int8 layers numbered in ``leave`` excepted: their caller
        restores them in its own pass)."""
        if self._seed is None:
            return
        for k, layer, start, stop, at in self._chunks(skip={k for k, lay in enumerate(self.layers)
                                                            if lay.kind == "4bit" or k in leave}):
            skipped = self.skipped[k]
            mine = skipped[(skipped >= start) & (skipped < stop)] - start
            if fused.c_ready(layer.codes):
                self._c_int8(k, layer, start, stop, [(self._seed, self._scale)], "restore",
                             noise_seed(self._seed, "perturb"), antithetic=self._scale < 0,
                             kept=_flags(mine, stop - start))
            else:
                d = self._int8_steps(layer, start, stop, at, self._seed, self._scale)
                layer.write(start, stop, layer.read(start, stop) - d.index_fill_(0, mine, 0))
        for layer, base in zip(self.layers, self.base or []):
            if base is not None:
                layer.codes.copy_(base)
        self.base, self.skipped = None, [None] * len(self.layers)
        self._seed, self._scale = None, 0.0

    def _c_move(self, k, layer, terms, seed_of_noise, antithetic=False, update=None) -> bool:
        """A whole 4-bit layer's move on the C library (``fused.c_grid4``: the same numbers as the chunked torch
        path below, one pass, no temporaries); False where it cannot run (then the torch path does).
        ``update``: (lr, lr x weight decay or None) for the update, None for a perturbation."""
        lr, decay_coef = update if update is not None else (0.0, None)
        qs = layer.weight.quant_state
        return fused.c_grid4(layer.codes.view(-1), layer.numel, self.offsets[k], block_absmax(qs).contiguous(),
                             qs.blocksize, self.grids[k], self.direction, terms, update=update is not None, lr=lr,
                             decay_coef=decay_coef, noise_seed=seed_of_noise if self.stochastic else None,
                             antithetic=antithetic)

    def _c_int8(self, k, layer, start, stop, terms, mode, seed_of_noise, antithetic=False, kept=None, lr=0.0,
                decay_coef=None, pending=None, k_pending=None) -> torch.Tensor:
        """Values ``start`` .. ``stop - 1`` of an int8 layer on the C library (``fused.c_int8``: the torch path's
        numbers), the ``pending`` perturbation (``_take_pending``) restored in the same pass."""
        restore = None
        if pending is not None:
            seed, scale, skipped = pending
            at = skipped[k_pending]
            kept = _flags(at[(at >= start) & (at < stop)] - start if at is not None else None, stop - start)
            restore = (seed, scale, noise_seed(seed, "perturb") if self.stochastic else 0, scale < 0)
        return fused.c_int8(layer.codes.view(-1), start, stop, layer.shape[1], self.offsets[k],
                            row_scales(layer.module).contiguous(), self.direction, terms, mode, kept=kept, lr=lr,
                            decay_coef=decay_coef, noise_seed=seed_of_noise if self.stochastic else None,
                            antithetic=antithetic, restore=restore)

    def _grid_move(self, k, layer, codes, start, stop, at, delta, noise, antithetic=False) -> torch.Tensor:
        """4-bit codes moved by ``delta`` (weight units) onto the layer's levels; codes whose level does not
        change keep their code (FP4's -0 stays -0)."""
        levels, rank, code_of = self.grids[k]
        absmax = layer.scale(start, stop)
        target = levels[rank[codes]] + torch.where(absmax > 0, delta / absmax, 0.0)
        if noise is not None and antithetic:
            noise = 1 - noise
        moved = round_to_levels(target, levels, noise)
        return torch.where(moved == rank[codes], codes, code_of[moved])

    # -- the update -------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, grads: list[tuple[int, float]], optimizer, step: int) -> None:
        pending, on_c = self._take_pending()
        lr, decay = optimizer.lr(step), optimizer.weight_decay
        stream = int(grads[0][0])  # the update's rounding noise: its own stream of the step's first seed
        done = {k for k, layer in enumerate(self.layers) if layer.kind == "4bit" and self._c_move(
            k, layer, grads, noise_seed(stream, "update"), update=(lr, lr * decay if decay else None))}
        for k, layer, start, stop, at in self._chunks(skip=done):
            if k in on_c:
                self._c_int8(k, layer, start, stop, grads, "update", noise_seed(stream, "update"), lr=lr,
                             decay_coef=lr * decay if decay else None, pending=pending, k_pending=k)
                continue
            codes = layer.read(start, stop)
            est = None
            for seed, coef in grads:
                z = self._z(int(seed), at, stop - start, codes.device)
                est = z.mul_(coef) if est is None else est.add_(z, alpha=coef)
            unit = layer.scale(start, stop)
            value = codes.double() * unit if layer.kind == "int8" else \
                self.grids[k][0][self.grids[k][1][codes]] * unit
            delta = est.mul_(-lr) - (lr * decay) * value if decay else est.mul_(-lr)
            noise = self._noise(stream, "update", at, stop - start, codes.device)
            if layer.kind == "int8":
                d = round_offset(torch.where(unit > 0, delta / unit, 0.0), noise)
                layer.write(start, stop, (codes + d).clamp_(-INT8_MAX, INT8_MAX))
            else:
                layer.write(start, stop, self._grid_move(k, layer, codes, start, stop, at, delta, noise))

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


def _flags(positions: torch.Tensor | None, n: int) -> torch.Tensor:
    """One uint8 per value of a chunk, 1 at ``positions``: the C pass's form of the skipped positions."""
    flags = torch.zeros(n, dtype=torch.uint8)
    return flags if positions is None else flags.index_fill_(0, positions.cpu(), 1)


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
        if cfg.quant == "int8":  # the few edge positions per row, between a perturbation and its restore
            held = SKIPPED_PER_ROW * 8 * sum(o for o, _ in arch.linears)
        else:  # the packed 4-bit codes, copied during the two forwards
            held = sum(o * i for o, i in arch.linears) / 2
        chunk = min(CHUNK, max(inputs.scope_sizes, default=0))
        return Price(trainable=held, update=chunk * (TEMP_BYTES + 8 * (cfg.q - 1)), nnz=nnz)
