"""Training: one epoch loop (:mod:`~atlasmap.training.loop`) run by a strategy (one process, or data-parallel
under torchrun: :mod:`~atlasmap.training.strategy`), its settings (:mod:`~atlasmap.training.config`), the
optimizer (:mod:`~atlasmap.training.optim`), scVI's hand-written step (:mod:`~atlasmap.training.fused_step`)
and the opt-in step accelerations (:mod:`~atlasmap.training.accel`)."""

from atlasmap.training.config import TrainConfig, default_max_epochs, kl_weight_at, split_cells
from atlasmap.training.loop import evaluate_loss, train_module, trainable_parameters

__all__ = ["TrainConfig", "default_max_epochs", "evaluate_loss", "kl_weight_at", "split_cells", "train_module",
           "trainable_parameters"]
