"""`cones2_train`: learn a subject's residual from a few images (SPEC section 1).

    import cones2_train
    residual = cones2_train.train_residual("path/to/sd21", "photos/dog", "dog",
                                           cones2_train.TrainConfig(steps=4000, seed=0))
    residual.save("dog.safetensors")     # what `cones2-engine generate --subject dog=dog.safetensors` loads
"""
from .config import TrainConfig
from .interrupt import TrainingInterrupted
from .trainer import Trainer, train_residual

__all__ = ["TrainConfig", "Trainer", "TrainingInterrupted", "train_residual"]
