"""Training: :func:`train` (the loop, :mod:`zoo.train.loop`) and one task per evaluation protocol
(:mod:`zoo.train.tasks`: the data and the loss of a family, registered with :func:`register_task`)."""
from zoo.train.loop import train
from zoo.train.tasks import (ClassificationTask, CocoTask, DetrTask, ReidTask, TorchvisionDetectionTask, TrainTask,
                             VideoTask, build_task, register_task)

__all__ = ["train", "build_task", "register_task", "TrainTask", "CocoTask", "DetrTask", "TorchvisionDetectionTask",
           "ReidTask", "ClassificationTask", "VideoTask"]
