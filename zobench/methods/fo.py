"""First-order baselines, for context: full fine-tuning with SGD or AdamW, and LoRA (peft). They run a
backward pass, so they hold what ZO avoids: gradients, optimizer state and the activations autograd
saves for the backward pass."""

from __future__ import annotations

from zobench.methods.base import Method, Price, PriceInputs, register
from zobench.models.lora import add_lora
from zobench.zo.fo import FOTrainer


class FirstOrder(Method):
    optimizer = "sgd"

    def trainer(self, run, model):
        return FOTrainer(model, run.loss_fn, self.optimizer, run.cfg.lr, run.cfg.weight_decay)

    def build_stepper(self, run):
        return self.trainer(run, run.model), None

    def price(self, inputs: PriceInputs) -> Price:
        # Gradients exist at the end of the backward pass and during the optimizer step, when the saved
        # activations are gone: they are the step's "update" moment, beside the optimizer state and
        # AdamW's foreach temporaries (one parameter-sized tensor at a time).
        n, db = sum(inputs.scope_sizes), inputs.dtype_bytes
        adam = self.optimizer == "adamw"
        return Price(optimizer=n * 2 * db if adam else 0, update=n * db * (2 if adam else 1), nnz=n,
                     saved_activations=saved_activations(inputs, frozen_linears=False))


def saved_activations(inputs: PriceInputs, frozen_linears: bool) -> float:
    """Bytes autograd keeps for the backward pass of one training forward (Llama-style blocks).

    Per token and block, in the model dtype: each RMSNorm keeps its input and normalized output (2h, two
    norms); attention keeps q, k, v (after repeat_kv) and its output (4 x q width); the MLP keeps
    act(gate), up and their product's input (3 x intermediate). Linear layers keep their input only when
    their weight is trained: q/k/v and gate/up share the normed input (2h), o_proj its input (q width),
    down_proj its input (intermediate). The head keeps its input and the float32 logits at the scored
    positions with their log-softmax.
    """
    arch, db = inputs.arch, inputs.dtype_bytes
    h, a, inter = arch.hidden, arch.q_width, arch.intermediate
    per_token = 4 * h + 4 * a + 3 * inter
    if not frozen_linears:
        per_token += 2 * h + a + inter
    head = inputs.tokens * h * db + 2 * inputs.scored_positions * arch.vocab * 4
    return arch.layers * inputs.tokens * per_token * db + head


@register
class FOSGD(FirstOrder):
    name = "fo-sgd"
    optimizer = "sgd"


@register
class FOAdam(FirstOrder):
    name = "fo-adam"
    optimizer = "adamw"


@register
class LoRA(FirstOrder):
    name = "lora"  # the adapter's shape: the cell's lora_r, lora_alpha and lora_targets
    optimizer = "adamw"
    keeps_adapter = True

    def build_stepper(self, run):
        # A drawn from torch's generator seeded with the cell's seed for this call: the same adapter whatever
        # ran before it in the process (the cell seeds that generator at its start, and nothing between
        # there and here draws from it, so cells kept before this said so drew the same A)
        cfg = run.cfg
        return self.trainer(run, add_lora(run.model, cfg.lora_r, cfg.lora_alpha, cfg.lora_modules, cfg.seed)), None

    def price(self, inputs: PriceInputs) -> Price:
        # peft keeps adapters in float32 (autocast_adapter_dtype): weights, then gradients and AdamW's
        # temporaries at the step, and two AdamW moments.
        cfg = inputs.cfg
        n = sum(cfg.lora_r * (o + i) for (o, i), name in zip(inputs.arch.linears, inputs.arch.linear_names)
                if name.rsplit(".", 2)[-2] in cfg.lora_modules)
        return Price(trainable=n * 4, optimizer=n * 4 * 2, update=n * 4 * 2, nnz=n,
                     saved_activations=saved_activations(inputs, frozen_linears=True))
