"""Evaluators: data sources, training, knowledge-distillation fine-tuning and accuracy."""

from autocompress.evaluators.accuracy import evaluate, predict_logits
from autocompress.evaluators.data import DATA_SOURCES, DataBundle, load_data
from autocompress.evaluators.finetune import finetune, make_optimizer
from autocompress.evaluators.train import cache_dir, pretrained_builtin, train

__all__ = ["DATA_SOURCES", "DataBundle", "cache_dir", "evaluate", "finetune", "load_data", "make_optimizer",
           "predict_logits", "pretrained_builtin", "train"]
