"""Training: SFT (Stage 0, Eq. 1-2) and the IPR mixed-loss trainer (Stage 4, Eq. 10).

Entry points: ``sft.train_sft`` and ``ipr_trainer.train_ipr`` (both return a
``common.TrainResult`` and save a plain safetensors checkpoint through
``ipr_core.policies.checkpoint_io``). Both run the one optimisation loop of
``loop.run_loop`` with their own per-micro-batch loss (``loop.Step``).
Submodules are imported lazily by callers: importing this package does not
import torch. The algorithm: docs/algorithm.md; why a trainer of our own and
CPU-safe settings: docs/models.md.
"""
