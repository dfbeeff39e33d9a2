"""Fine-tuning after pruning (masks held) or after quantization (shared centroids trained).

For Codebook modules nothing special is needed: their forward decodes by gathering
codebook[code], so autograd already gives each centroid the sum of the gradients of the weights
that share it (Deep Compression's grouped gradient, eq. 3), and pruned positions simply do not
exist. `FineTune` is the convenience form; any callable `train_step(model)` works instead.
"""
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List

import torch
from torch import nn

__all__ = ["FineTune", "finetune", "run_finetune"]


@dataclass
class FineTune:
    """Convenience fine-tuning: `steps` optimizer steps over `dataloader` (cycled), each batch
    (inputs, targets) with loss_fn(model(inputs), targets). Adam at `lr` over every trainable
    parameter (centroids, biases, other dense parameters)."""
    dataloader: Iterable
    loss_fn: Callable[[Any, Any], torch.Tensor]
    steps: int
    lr: float = 1e-4
    weight_decay: float = 0.0
    progress: bool = True
    desc: str = "fine-tune"
    schedule: str = "cosine"      # learning rate over the steps: "cosine" (to 0) or "constant"

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be an int >= 0, got {self.steps!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not callable(self.loss_fn):
            raise ValueError("loss_fn must be callable")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")

    def __call__(self, model: nn.Module) -> List[float]:
        return finetune(model, self.dataloader, self.loss_fn, self.steps, self.lr,
                        self.weight_decay, self.progress, self.desc, self.schedule)


def finetune(model: nn.Module, dataloader: Iterable, loss_fn, steps: int, lr: float = 1e-4,
             weight_decay: float = 0.0, progress: bool = True, desc: str = "fine-tune",
             schedule: str = "cosine") -> List[float]:
    """Train `model` for `steps` batches (Adam; lr cosine-annealed to 0 or constant); returns
    the loss of each step."""
    from tqdm.auto import tqdm
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("finetune: the model has no trainable parameters")
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps)) if schedule == "cosine" else None
    was_training = model.training
    model.train()
    losses = []
    batches = _cycle(dataloader)
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        x, y = next(batches)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    model.train(was_training)
    return losses


def _cycle(dataloader):
    """Re-iterate the loader each epoch (unlike itertools.cycle, which would keep every batch of
    the first epoch in memory and replay one shuffle order forever)."""
    while True:
        empty = True
        for batch in dataloader:
            empty = False
            yield batch
        if empty:
            raise ValueError("finetune: the dataloader yields no batches")


def run_finetune(spec, model: nn.Module, what: str) -> None:
    """Run a fine-tuning spec: None, a callable train_step(model), a FineTune, or a dict of
    FineTune's fields. `what` names the argument in error messages."""
    if spec is None:
        return
    if isinstance(spec, dict):
        try:
            spec = FineTune(**spec)
        except TypeError as e:
            raise ValueError(f"{what}: a dict must hold FineTune fields "
                             "(dataloader, loss_fn, steps, lr, ...): {e}") from None
    if not callable(spec):
        raise ValueError(f"{what} must be None, a callable train_step(model), a FineTune or a dict, "
                         f"got {type(spec).__name__}")
    spec(model)
