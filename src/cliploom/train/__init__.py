"""Error-Recycling Fine-Tuning of the SVI LoRA (``cliploom train-svi``); see docs/training.md.

    from cliploom.train import load_config, train
    train(load_config("configs/svi-shapesworld.yaml"))
"""

from .config import TrainConfig, config_from_dict, load_config
from .loop import SVITrainer, train

__all__ = ["SVITrainer", "TrainConfig", "config_from_dict", "load_config", "train"]
