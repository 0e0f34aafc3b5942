"""Refusing a model whose forward a sweep cannot reproduce cell by cell.

A sweep's score is the effect of one patch: the patched run's metric minus the unpatched
run's, each cell a forward pass of its own in effect (the cells are rows of batches, the
unpatched values computed once). In training mode a model's forward can be random
(dropout: every forward, and every row, draws other masks) or mix the rows of a batch
(batch normalization uses the batch's statistics, and updates its running ones): the
scores would then be noise, or depend on which cells share a batch, and the sweep would
change the model's buffers. Nothing a sweep could do would honour that, so it refuses
before running anything (the sweep never changes the model's mode itself: no side
effects).
"""

from __future__ import annotations

import torch

DROPOUTS = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
            torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)
BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
               torch.nn.SyncBatchNorm)
SHOWN = 3  # modules named in the error (then a count)


def random_in_training(module: torch.nn.Module) -> list[str]:
    """The submodules of ``module`` in training mode whose forward is random or mixes the
    rows of a batch, each as ``"path: why"``: dropout modules with ``p > 0``, batch norms,
    and modules with a float setting named ``*dropout*`` above 0 (transformers' attention
    modules pass ``attention_dropout`` to a functional dropout while training)."""
    found = []
    for path, sub in module.named_modules():
        if not sub.training:
            continue
        name = path or "(model)"
        if isinstance(sub, DROPOUTS):
            if sub.p > 0:
                found.append(f"{name}: {type(sub).__name__}(p={sub.p})")
        elif isinstance(sub, BATCH_NORMS):
            found.append(f"{name}: {type(sub).__name__} (normalizes by the batch)")
        else:
            settings = [f"{key}={value}" for key, value in vars(sub).items()
                        if "dropout" in key.lower() and isinstance(value, float) and value > 0]
            if settings:
                found.append(f"{name}: {', '.join(settings)}")
    return found


def check_reproducible(model, what: str) -> None:
    """Raise a ``ValueError`` naming them where ``model`` (an envoy or a module) has modules
    in training mode whose forward is random or mixes a batch's rows (see
    :func:`random_in_training`); ``what``: the experiment, for the message."""
    module = getattr(model, "_module", model)
    found = random_in_training(module)
    if not found:
        return
    shown = "; ".join(found[:SHOWN]) + (f"; and {len(found) - SHOWN} more"
                                         if len(found) > SHOWN else "")
    raise ValueError(
        f"{what}: the model is in training mode, where its forward is random or mixes the "
        f"rows of a batch ({shown}): each cell would draw other dropout masks than the "
        f"unpatched runs (or be normalized with the other cells of its batch), so its "
        f"score would not be the patch's effect; call model.eval() first (the sweep "
        f"leaves the model's mode as it is)")
