"""Training: SFT (Stage 0, Eq. 1-2) and the IPR mixed-loss trainer (Stage 4, Eq. 10).

Entry points: ``sft.train_sft`` and ``ipr_trainer.train_ipr`` (both return a
``common.TrainResult`` and save a plain safetensors checkpoint). Submodules are
imported lazily by callers: importing this package does not import torch.
"""
