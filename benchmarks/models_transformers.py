"""Transformer encoders for the benchmarks, built from configs with random weights (nothing is downloaded).

``bert_mini``: a 4-layer BERT (hidden 256, 4 heads, MLP 1024) reading 128 token ids, the size of
Google's BERT-mini; ``EXAMPLE_INPUT`` is the token ids the space, export and timing use.

    python benchmarks/compression_speedup.py --models benchmarks/models_transformers.py:bert_mini,torchvision:vit_b_16
"""

from __future__ import annotations

import torch

SEQ = 128
EXAMPLE_INPUT = (torch.randint(1000, 30000, (1, SEQ), generator=torch.Generator().manual_seed(0)),)


def bert_mini() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=1024, max_position_embeddings=512)
    return BertModel(config, add_pooling_layer=False).eval()
