"""The trainable set of a ZO method: which values move, how they are perturbed and updated.

Two shapes, one interface:

* ``DenseTrainable`` (full ZO, MeZO): every weight of the chosen tensors. Perturbed in place, one tensor
  at a time, so the only temporary is one tensor's z. The restore after the second forward is folded
  into the update pass: a step makes three passes over the weights (+eps, -2eps, restore+update)
  instead of MeZO's four.
* ``SparseTrainable`` (random / sensitive / magnitude / task_grad masks): only ``nnz`` selected entries,
  held as flat indices plus a float32 master copy of their values (or whole small tensors: the value
  vectors of quantized dense-and-sparse layers, see ``zobench.quant.sparse``). z has length nnz, never the
  tensor's size: a 0.1% mask costs 0.1% of the work (a full-size z times a 0/1 mask would cost as much
  as full ZO). Perturbing writes ``master + scale * z`` into the selected entries and restoring writes
  ``master`` back, so restore is bit-exact in every dtype.

Why a float32 master: in float16/bfloat16, ``w + eps z - 2 eps z + eps z`` does not return to ``w`` (MeZO
lost accuracy on fp16 models this way), and updates of size lr * g are often below half an ulp. In-place
dense perturbation in float32 is not bit-exact either (rounding of ``w + eps z``); ``DenseTrainable`` with
``master=True`` keeps a float32 copy of all trainable weights for exact restores, at the cost of that copy.
``zo.drift.measure_restore_drift`` reports what the chosen set-up actually does.

Where z comes from (``generator``): ``philox`` (default), the counter-based direction of ``zobench.zo.fused``,
whose passes add the terms in place with no z temporary (one pass per apply, restore and SGD update, and a
fused ``fold_step``); ``torch``, the torch.Generator draw of ``zobench.zo.directions`` chunk by chunk, kept
so that runs saved before philox existed replay bit for bit. Momentum and Adam need z itself: they get it
chunk by chunk from either generator.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from zobench.errors import UserError
from zobench.spec.config import GENERATORS
from zobench.zo import fused
from zobench.zo.directions import draw, make_generator
from zobench.zo.raw_io import read_raw, write_raw
from zobench.zo.sizes import CHUNK  # values per z draw in dense passes (16 MiB of float32)


def check_generator(name: str) -> str:
    if name not in GENERATORS:
        raise UserError(f"unknown generator '{name}' (expected one of: {', '.join(GENERATORS)})")
    if name == "philox":
        fused.path()  # builds or loads the kernel now, while the run sets up, not inside its first timed step
    return name


class Trainable:
    """Common bookkeeping: the current perturbation (seed, scale) applied to the live weights."""

    numel: int
    direction: str
    generator = "torch"  # where z comes from (module docstring); subclasses take it as a setting
    # How the trained values of a chosen step can be kept besides the trajectory (the cell's dev selection
    # and save), declared by each shape: ``snapshot`` copies them in memory (a sparse set's few values);
    # ``save_raw`` / ``load_raw`` write them to a file and read them back (dense weights, ``nbytes`` of them).
    snapshots: ClassVar[bool] = False
    saves_raw: ClassVar[bool] = False
    # What a save keeps, where it is not one of the shapes above (QZO's scales): ``delta_parts``.
    keeps_own_delta: ClassVar[bool] = False

    def __init__(self):
        self._seed: int | None = None
        self._scale = 0.0

    def apply(self, seed: int, scale: float) -> None:
        """Make the live weights ``base + scale * z(seed)``."""
        raise NotImplementedError

    def restore(self) -> None:
        """Make the live weights ``base`` again."""
        raise NotImplementedError

    def update(self, grads: list[tuple[int, float]], optimizer, step: int) -> None:
        """Apply ``optimizer`` to the estimate ``sum_j coef_j * z(seed_j)``; the live weights end at the new base."""
        raise NotImplementedError

    def snapshot(self):
        """The trained values now, copied (where ``snapshots``)."""
        raise NotImplementedError

    def save_raw(self, f) -> None:
        """Write the trained values to the binary file ``f`` (where ``saves_raw``)."""
        raise NotImplementedError

    def load_raw(self, f) -> None:
        """Read back what ``save_raw`` wrote (where ``saves_raw``)."""
        raise NotImplementedError

    def delta_parts(self) -> tuple[str, dict, dict]:
        """``(kind, tensors, extra)`` of the delta a save writes (where ``keeps_own_delta``)."""
        raise NotImplementedError

    @torch.no_grad()
    def fold_step(self, grads: list[tuple[int, float]], optimizer, step: int, seed: int, scale: float) -> None:
        """``update(grads, optimizer, step)`` then ``apply(seed, scale)`` (ZO2's fold of one step's update into
        the next step's first perturbation): the same weights bit for bit, in one pass where it can."""
        if self._fusable(optimizer):
            self._sgd_pass(grads, optimizer, step, then=(seed, scale))
        else:
            self.update(grads, optimizer, step)
            self.apply(seed, scale)

    def _fusable(self, optimizer) -> bool:
        """Whether an update by ``optimizer`` is a fused pass: philox z and no optimizer state."""
        return self.generator == "philox" and optimizer.plain

    def _sgd_pass(self, grads, optimizer, step: int, then: tuple[int, float] | None = None) -> None:
        """The SGD update of ``grads`` (then the perturbation ``then``) as fused passes."""
        raise NotImplementedError

    @staticmethod
    def _sgd_terms(grads, optimizer, step: int) -> tuple[list[tuple[int, float]], float]:
        """An SGD update as fused-pass terms: ``w <- w * decay - lr * sum_j coef_j z(seed_j)``."""
        lr = optimizer.lr(step)
        return [(seed, -lr * coef) for seed, coef in grads], 1.0 - lr * optimizer.weight_decay


class DenseTrainable(Trainable):
    saves_raw = True

    def __init__(self, params: list[tuple[str, torch.nn.Parameter]], direction: str = "rademacher",
                 master: bool = False, decay_names: set[str] | None = None, tag: str | None = None,
                 generator: str = "philox"):
        super().__init__()
        self.tag = tag  # keeps optimizer state apart when several trainables share one optimizer
        self.names = [n for n, _ in params]
        self.params = [p for _, p in params]
        self.direction = direction
        self.generator = check_generator(generator)
        self.numel = sum(p.numel() for p in self.params)
        # Global index of each tensor's first value: z of a value depends on it alone (philox).
        self.offsets = [sum(p.numel() for p in self.params[:i]) for i in range(len(self.params))]
        # Weight decay on matrices only (MeZO: not on biases and norms).
        self.decay = [decay_names is None and p.dim() >= 2 or (decay_names is not None and n in decay_names)
                      for n, p in params]
        self.masters = [p.detach().float().clone() for p in self.params] if master else None

    def _chunks(self, seed: int):
        """Yield (key, live chunk, master chunk or None, z) over all tensors in a fixed order.

        z is drawn per chunk of at most CHUNK values, never per whole tensor: a 28M-value embedding
        would otherwise need a 113 MiB z, more than the forward pass's activations on a small model,
        and the ZO peak would exceed the inference peak.
        """
        g = make_generator(seed, self.params[0].device) if self.generator == "torch" else None
        for i, p in enumerate(self.params):
            flat = p.detach().view(-1)
            master = self.masters[i].view(-1) if self.masters is not None else None
            dtype = torch.float32 if master is not None else p.dtype
            for c, start in enumerate(range(0, flat.numel(), CHUNK)):
                stop = min(start + CHUNK, flat.numel())
                if g is not None:
                    z = draw(stop - start, g, self.direction, dtype, p.device)
                else:
                    z = fused.fill_z(torch.empty(stop - start, device=p.device), self.offsets[i] + start,
                                     self.direction, seed).to(dtype)
                key = (i, c) if self.tag is None else (self.tag, i, c)
                yield key, i, flat[start:stop], None if master is None else master[start:stop], z

    def directions(self, seed: int) -> list[torch.Tensor]:
        """The full z of every tensor for ``seed`` (materialised: for tests and diagnostics only)."""
        parts: dict[int, list] = {}
        for _, i, _, _, z in self._chunks(seed):
            parts.setdefault(i, []).append(z)
        return [torch.cat(parts[i]).view(p.shape) for i, p in enumerate(self.params)]

    @torch.no_grad()
    def apply(self, seed: int, scale: float) -> None:
        if self._seed is not None and self._seed != seed:
            self.restore()
        if self.generator == "philox":
            for i, p in enumerate(self.params):
                if self.masters is not None:
                    fused.zpass(p.detach(), self.offsets[i], self.direction, master=self.masters[i].view(-1),
                                live_terms=[(seed, scale)])
                else:
                    fused.zpass(p.detach(), self.offsets[i], self.direction, [(seed, scale - self._scale)])
        else:
            for _, _, live, master, z in self._chunks(seed):
                if master is not None:
                    live.copy_(master.add(z, alpha=scale))
                else:
                    live.add_(z, alpha=scale - self._scale)
        self._seed, self._scale = seed, scale

    @torch.no_grad()
    def restore(self) -> None:
        if self._seed is None:
            return
        if self.masters is not None:
            for p, m in zip(self.params, self.masters):
                p.copy_(m)
        elif self.generator == "philox":
            for p, offset in zip(self.params, self.offsets):
                fused.zpass(p.detach(), offset, self.direction, [(self._seed, -self._scale)])
        else:
            for _, _, live, _, z in self._chunks(self._seed):
                live.add_(z, alpha=-self._scale)
        self._seed, self._scale = None, 0.0

    @torch.no_grad()
    def update(self, grads: list[tuple[int, float]], optimizer, step: int) -> None:
        if self._fusable(optimizer):
            return self._sgd_pass(grads, optimizer, step)
        # Fold the pending restore into the update pass when the estimate uses the same z
        # (q = 1, the common case): one z draw per chunk serves both.
        fold = self._seed is not None and len(grads) == 1 and grads[0][0] == self._seed
        if self._seed is not None and not fold:
            self.restore()
        streams = [self._chunks(seed) for seed, _ in grads]
        for parts in zip(*streams):
            key, i, live, master, _ = parts[0]
            est = None
            for (seed, coef), (_, _, _, _, z) in zip(grads, parts):
                if fold and master is None:
                    live.add_(z, alpha=-self._scale)  # restore with the z already in hand
                est = z.mul_(coef) if est is None else est.add_(z, alpha=coef)
            values = master if master is not None else live
            optimizer.update(key, values, est, step, decay=self.decay[i])
            if master is not None:
                live.copy_(values)
        self._seed, self._scale = None, 0.0

    def _sgd_pass(self, grads, optimizer, step: int, then: tuple[int, float] | None = None) -> None:
        """Restore (a pending perturbation, in place), decay, update and ``then`` the next perturbation: one
        pass per tensor, the same float ops in the same order as those passes one by one (``zpass``)."""
        terms, decay = self._sgd_terms(grads, optimizer, step)
        undo = [(self._seed, -self._scale)] if self._seed is not None and self.masters is None else []
        after = [then] if then is not None else []
        for i, p in enumerate(self.params):
            at = (len(undo), decay) if self.decay[i] and optimizer.weight_decay else None
            if self.masters is not None:
                fused.zpass(p.detach(), self.offsets[i], self.direction, terms, master=self.masters[i].view(-1),
                            live_terms=after, decay=at)
            else:
                fused.zpass(p.detach(), self.offsets[i], self.direction, undo + terms + after, decay=at)
        self._seed, self._scale = then if then is not None else (None, 0.0)

    # -- the weights at one step, kept on disk (a dense run's best dev step, see DevSelection) --------------
    def _saved(self) -> list[torch.Tensor]:
        """The tensors that hold the trained values: the float32 masters when kept, else the live weights."""
        return self.masters if self.masters is not None else [p.detach() for p in self.params]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._saved())

    @torch.no_grad()
    def save_raw(self, f, rewind: bool = True) -> None:
        """Write the trained values to the binary file ``f`` as raw bytes, tensor after tensor (no pickle,
        no second copy in memory: CPU tensors are written from their own storage); from its start, unless
        ``rewind`` is false (several trainables one after the other in one file)."""
        write_raw(f, self._saved(), rewind)

    @torch.no_grad()
    def load_raw(self, f, rewind: bool = True) -> None:
        """Read back what ``save_raw`` wrote into the trained tensors (and the live weights beside masters)."""
        if rewind:
            f.seek(0)
        for i, t in enumerate(self._saved()):
            read_raw(f, t, "weights")
            if self.masters is not None:
                self.params[i].detach().copy_(t)
        self._seed, self._scale = None, 0.0


class SparseTrainable(Trainable):
    snapshots = True

    def __init__(self, params: list[tuple[str, torch.nn.Parameter]], indices: dict[str, torch.Tensor],
                 direction: str = "rademacher", generator: str = "philox"):
        super().__init__()
        self.direction = direction
        self.generator = check_generator(generator)
        self.names, self.params, self.indices = [], [], []
        for name, p in params:
            idx = indices.get(name, ...)
            if idx is ... or (idx is not None and idx.numel() == 0) or p.numel() == 0:
                continue
            if not p.is_contiguous():
                raise ValueError(f"sparse ZO needs contiguous weights; {name} is not")
            self.names.append(name)
            self.params.append(p)
            # None: the whole tensor is trainable (the value vectors of dense-and-sparse layers).
            self.indices.append(None if idx is None else idx.to(device=p.device, dtype=torch.long).contiguous())
        self.sizes = [p.numel() if i is None else i.numel() for p, i in zip(self.params, self.indices)]
        self.numel = sum(self.sizes)
        self.offsets = [sum(self.sizes[:k]) for k in range(len(self.sizes))]  # global index of each first value
        device = self.params[0].device if self.params else torch.device("cpu")
        self.flat = self._adjoining()
        with torch.no_grad():
            self.master = torch.cat([p.view(-1).float() if i is None else p.view(-1)[i].float()
                                     for p, i in zip(self.params, self.indices)]) \
                if self.params else torch.zeros(0, device=device)

    def _adjoining(self) -> torch.Tensor | None:
        """One tensor over every trainable value where they are whole tensors lying end to end in one buffer,
        in order (``quant.sparse.pack_values``): a pass then reads and writes them in one operation."""
        if len(self.params) < 2 or any(i is not None for i in self.indices) or \
                len({(p.dtype, p.device) for p in self.params}) != 1:
            return None
        first = self.params[0]
        storage = first.untyped_storage().data_ptr()
        for p, offset in zip(self.params, self.offsets):
            if not p.is_contiguous() or p.untyped_storage().data_ptr() != storage or \
                    p.storage_offset() != first.storage_offset() + offset:
                return None
        return first.detach().as_strided((self.numel,), (1,), first.storage_offset())

    def snapshot(self) -> torch.Tensor:
        """The trained values now (nnz floats: small enough to keep the best ones of a run)."""
        return self.master.clone()

    @torch.no_grad()
    def load(self, values: torch.Tensor) -> None:
        """Make ``values`` (a ``snapshot``) the trained values again."""
        self.master.copy_(values)
        self._write(self.master)
        self._seed, self._scale = None, 0.0

    @classmethod
    def of_vectors(cls, vectors: list[tuple[str, torch.Tensor]], direction: str = "rademacher",
                   generator: str = "philox"):
        """Every value of each tensor is trainable: the sparse values of dense-and-sparse layers."""
        return cls(vectors, {name: None for name, _ in vectors}, direction, generator)

    def _write(self, values: torch.Tensor) -> None:
        if self.flat is not None:
            self.flat.copy_(values)
            return
        for p, idx, v in zip(self.params, self.indices, values.split(self.sizes)):
            if idx is None:
                p.view(-1).copy_(v)
            else:
                p.view(-1).index_copy_(0, idx, v.to(p.dtype))

    def z(self, seed: int) -> torch.Tensor:
        if self.generator == "philox":
            return fused.fill_z(torch.empty_like(self.master), 0, self.direction, seed)
        return draw(self.numel, make_generator(seed, self.master.device), self.direction, torch.float32,
                    self.master.device)

    def _segments(self):
        """(live tensor, its indices or None, its part of the master, global index of its first value)."""
        return zip(self.params, self.indices, self.master.split(self.sizes), self.offsets)

    def _one_pass(self) -> bool:
        """Whether a pass goes over the whole master at once, into a flat copy of the live values then written
        tensor by tensor: on the torch path (a GPU), where a pass per tensor cost ~3.5 ms of kernel launches
        whatever its length (224 tensors of a 7B random mask: 773 ms a perturbation on an H200). The same
        numbers: z of a value depends on its global index alone, and the copy is in the live values' dtype."""
        return (len(self.params) > 1 and fused.on_torch_path(self.master)
                and len({p.dtype for p in self.params}) == 1)

    def _zpass_all(self, terms, live_terms, decay) -> None:
        """``fused.zpass`` over every trainable value: straight into them where they adjoin (``_adjoining``),
        else per tensor or in one pass (``_one_pass``)."""
        if self.flat is not None:
            fused.zpass(self.flat, 0, self.direction, terms, master=self.master, live_terms=live_terms, decay=decay)
            return
        if self._one_pass():
            live = torch.empty(self.numel, dtype=self.params[0].dtype, device=self.master.device)
            fused.zpass(live, 0, self.direction, terms, master=self.master, live_terms=live_terms, decay=decay)
            self._write(live)
            return
        for p, idx, master, offset in self._segments():
            fused.zpass(p.detach(), offset, self.direction, terms, master=master, index=idx,
                        live_terms=live_terms, decay=decay)

    @torch.no_grad()
    def apply(self, seed: int, scale: float) -> None:
        if self.generator == "philox":
            self._zpass_all([], [(seed, scale)], None)
        else:
            self._write(self.master.add(self.z(seed), alpha=scale))
        self._seed, self._scale = seed, scale

    @torch.no_grad()
    def restore(self) -> None:
        self._write(self.master)
        self._seed, self._scale = None, 0.0

    @torch.no_grad()
    def update(self, grads: list[tuple[int, float]], optimizer, step: int) -> None:
        if self._fusable(optimizer):
            return self._sgd_pass(grads, optimizer, step)
        est = torch.zeros_like(self.master)
        for seed, coef in grads:
            est.add_(self.z(seed), alpha=coef)
        optimizer.update(0, self.master, est, step, decay=True)
        self._write(self.master)
        self._seed, self._scale = None, 0.0

    def _sgd_pass(self, grads, optimizer, step: int, then: tuple[int, float] | None = None) -> None:
        """The master's decay and update, then its live entries written (with ``then``, perturbed): one pass."""
        terms, decay = self._sgd_terms(grads, optimizer, step)
        at = (0, decay) if optimizer.weight_decay else None
        self._zpass_all(terms, [then] if then is not None else [], at)
        self._seed, self._scale = then if then is not None else (None, 0.0)
