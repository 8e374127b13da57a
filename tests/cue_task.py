"""A two-way task a tiny random Llama cannot answer at first, for the tests that say a method *learns*: the first
token (5 or 6) says which of two option tokens (3 or 4) comes last; the other seven tokens are noise. It is
scored as a classification cell scores options: the logits of the two option tokens at the last position.
A method learns it when held-out accuracy ends at least 10 points above the majority rate."""

from __future__ import annotations

import torch

CUE, OPTIONS = torch.tensor([5, 6]), [3, 4]
MARGIN = 0.10  # points above the majority rate that count as learned


def examples(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` rows of 8 token ids and their labels (0 or 1), drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randint(10, 60, (n, 8), generator=g)
    x[:, 0] = CUE[y]
    return x, y


def scores(model, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x).logits[:, -1, OPTIONS].float()


def loss(model, batch) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(scores(model, batch[0]), batch[1])


def accuracy(model, data) -> float:
    with torch.inference_mode():
        return float((scores(model, data[0]).argmax(-1) == data[1]).float().mean())


def majority(data) -> float:
    share = float(data[1].float().mean())
    return max(share, 1 - share)


def train_and_score(trainer, train, test, steps: int, batch_size: int = 32) -> tuple[float, float]:
    """Held-out accuracy of ``trainer``'s model before and after ``steps`` ZO steps on random batches of
    ``train`` (rows drawn from a fixed seed, so a run replays)."""
    before = accuracy(trainer.model, test)
    g = torch.Generator().manual_seed(3)
    for i in range(steps):
        rows = torch.randint(0, len(train[1]), (batch_size,), generator=g)
        trainer.step((train[0][rows], train[1][rows]), i)
    trainer.flush()
    return before, accuracy(trainer.model, test)
