"""Gradient caching (GradCache, Gao et al. 2021): a contrastive step over a batch of any size in the
memory of one chunk.

A contrastive loss couples every sample with every other, so the batch cannot simply be split into
accumulated micro-batches: each micro-batch would see only its own negatives. The loss itself is
cheap; the encoders are what need memory. So the step runs in three parts:

1. every chunk is embedded without gradients (activations freed at once);
2. the loss and its gradient with respect to the embeddings are computed on the whole batch, with
   negatives gathered across ranks as in the plain step;
3. every chunk is embedded again with gradients, and the cached embedding gradients are
   back-propagated through it (``sum(embedding · cached_grad)``).

The second pass must reproduce the first exactly, so the torch RNG state (dropout) of each chunk is
recorded in pass 1 and restored in pass 2. Model-side random choices (CoT tokens, caption kinds,
caption perturbations) do not need this: they are keyed by step and sample
(``RetrievalModule.sample_rng``), so they also come out the same whatever the chunk size.

Under DDP the chunks' backward passes run inside the wrapped forward, where the reducer does not
listen, so they accumulate locally; the backward of the returned loss (the last chunk plus the
loss's own parameters, such as a learnable temperature) then reduces the accumulated gradients once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .contract import TrainingPair

Terms = dict[str, torch.Tensor]


def batch_size(batch: dict[str, Any]) -> int:
    return len(batch["text"])


def split_batch(batch: dict[str, Any], chunk: int) -> list[dict[str, Any]]:
    """Consecutive slices of at most ``chunk`` samples. Every field of a collated batch is a tensor
    or a list whose first dimension is the batch (``datamodules.batching.collate``)."""
    n = batch_size(batch)
    out = []
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        part = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor | list | tuple) and len(value) == n:
                part[key] = value[start:stop]
            else:
                raise ValueError(f"batch field {key!r} is not per-sample (length {len(value)} for a batch of {n}); "
                                 "GradCache (model.init_args.grad_cache_chunk) can only split per-sample fields")
        out.append(part)
    return out


@dataclass
class RandomState:
    """The torch generators a forward may draw from (dropout): the CPU one and every CUDA device's."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor]

    @classmethod
    def capture(cls) -> RandomState:
        return cls(torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [])

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda:
            torch.cuda.set_rng_state_all(self.cuda)


def _fields(pair: TrainingPair) -> dict[str, torch.Tensor]:
    return {"query": pair.query, "target": pair.target, **{f"extras.{k}": v for k, v in pair.extras.items()}}


def _pair_of(fields: dict[str, torch.Tensor]) -> TrainingPair:
    extras = {k.removeprefix("extras."): v for k, v in fields.items() if k.startswith("extras.")}
    return TrainingPair(fields["query"], fields["target"], extras)


def _concat(pairs: list[TrainingPair]) -> dict[str, torch.Tensor]:
    names = list(_fields(pairs[0]))
    cat = {}
    for name in names:
        parts = [_fields(p)[name] for p in pairs]
        cat[name] = torch.cat(parts) if parts[0].ndim else parts[0]
    return cat


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(t.is_floating_point())


@dataclass
class CachedStep:
    """The outcome of a cached step: the whole batch's embeddings and loss terms; ``loss`` carries,
    besides its value, the gradient of the last chunk and of the loss's own parameters."""

    pair: TrainingPair
    terms: Terms


def grad_cache_step(batch: dict[str, Any], chunk: int, embed: Callable[[dict[str, Any]], TrainingPair],
                    terms_of: Callable[[TrainingPair, dict[str, Any]], Terms], backward_scale: float = 1.0,
                    backward: Callable[[torch.Tensor], None] | None = None) -> CachedStep:
    """One contrastive step in chunks of ``chunk`` samples (see the module docstring).

    ``embed`` is the family's training forward on a slice of the batch (every tensor it returns is
    per-sample); ``terms_of`` computes the loss terms from the whole batch's embeddings and must not
    run an encoder. The chunks' backward passes happen here (``backward``, default
    ``Tensor.backward``, on the surrogate scaled by ``backward_scale``, e.g. 1/accumulated batches);
    the returned ``terms["loss"]`` still has to be back-propagated by the caller.
    """
    chunks = split_batch(batch, chunk)
    states: list[RandomState] = []
    with torch.no_grad():
        cached = []
        for part in chunks:
            states.append(RandomState.capture())
            cached.append(embed(part))
    after = RandomState.capture()
    leaves = {k: _leaf(v) for k, v in _concat(cached).items()}
    del cached
    terms = terms_of(_pair_of(leaves), batch)
    loss = terms["loss"]
    if not torch.isfinite(loss):
        return CachedStep(_pair_of(leaves), terms)  # the caller reports or skips the step; no backward
    wanted = {k: v for k, v in leaves.items() if v.requires_grad}
    grads = dict(zip(wanted, torch.autograd.grad(loss, list(wanted.values()), retain_graph=True,
                                                 allow_unused=True), strict=True))
    run_backward = backward or torch.Tensor.backward
    offset, last = 0, None
    for i, part in enumerate(chunks):
        states[i].restore()
        fields = _fields(embed(part))
        n = batch_size(part)
        surrogate = None
        for name, value in fields.items():
            grad = grads.get(name)
            if grad is None or not value.requires_grad:
                continue  # not trained through (a frozen side, a mask) or not used by the loss
            g = grad[offset:offset + n] if value.ndim else grad
            term = (value * g.to(value.dtype)).sum()
            surrogate = term if surrogate is None else surrogate + term
        offset += n
        if surrogate is None:
            continue
        if i < len(chunks) - 1:
            run_backward(surrogate * backward_scale)
        else:
            last = surrogate
    after.restore()
    if last is not None:  # the value stays the loss's; the gradient adds the last chunk's
        terms["loss"] = loss + (last - last.detach())
    return CachedStep(_pair_of(leaves), terms)
