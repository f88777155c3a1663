"""A text classifier you trained, searched with your own metric (macro F1).

The model is a small BERT (``transformers``, built from a config: nothing is
downloaded) that reads token ids and an attention mask and returns a
``ModelOutput``. The data is generated: sentences of 24 tokens in which a few
"positive" or "negative" words decide the label (3 classes: positive,
negative, neutral), so the example runs offline and the metric means something.

    python examples/text_task.py text_model.pt          # train the model (about a minute on 2 cores)
    autocompress search --model examples/text_task.py:make_model --weights text_model.pt \\
        --task examples/text_task.py:make_task --target mobile --budget 0.5x --out text-out
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import autocompress

VOCAB, SEQ, CLASSES = 200, 24, 3
POSITIVE, NEGATIVE = range(10, 40), range(40, 70)  # token ids of sentiment words; 70.. are neutral words
# What `autocompress space/profile --model examples/text_task.py:make_model` trace with (without --task).
EXAMPLE_INPUT = (torch.randint(70, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(0)),
                 torch.ones(1, SEQ, dtype=torch.long))


def make_model() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=SEQ, num_labels=CLASSES)
    return BertForSequenceClassification(config).eval()


def sentences(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` generated sentences: (token ids, attention mask, labels). Shorter ones are padded with 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(70, VOCAB, (n, SEQ), generator=g)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    for i in range(n):
        pos = int(torch.randint(0, 3, (1,), generator=g))
        neg = int(torch.randint(0, 3, (1,), generator=g))
        if labels[i] == 0:
            pos = neg + 1 + pos % 2  # more positive words than negative ones
        elif labels[i] == 1:
            neg = pos + 1 + neg % 2
        else:
            neg = pos
        slots = torch.randperm(SEQ - 4, generator=g)[:pos + neg] + 1
        words = [POSITIVE[int(torch.randint(0, 30, (1,), generator=g))] for _ in range(pos)] + \
                [NEGATIVE[int(torch.randint(0, 30, (1,), generator=g))] for _ in range(neg)]
        ids[i, slots] = torch.tensor(words, dtype=torch.long)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    lengths = torch.randint(SEQ - 4, SEQ + 1, (n,), generator=g)
    for i, length in enumerate(lengths.tolist()):
        ids[i, length:], mask[i, length:] = 0, 0
    return ids, mask, labels


def macro_f1(pred: torch.Tensor, labels: torch.Tensor) -> float:
    scores = []
    for c in range(CLASSES):
        tp = int(((pred == c) & (labels == c)).sum())
        fp, fn = int(((pred == c) & (labels != c)).sum()), int(((pred != c) & (labels == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / CLASSES


def batches(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, size: int = 32) -> list:
    return [((ids[i:i + size], mask[i:i + size]), labels[i:i + size]) for i in range(0, len(ids), size)]


def make_task() -> autocompress.Task:
    train_ids, train_mask, train_y = sentences(1024, seed=1)
    test_ids, test_mask, test_y = sentences(512, seed=2)

    def evaluate(model: torch.nn.Module) -> float:
        logits = model(test_ids, test_mask)["logits"]
        return macro_f1(logits.argmax(-1), test_y)

    return autocompress.Task(evaluate=evaluate, train=batches(train_ids, train_mask, train_y),
                             example_input=(test_ids[:1], test_mask[:1]), metric="macro_f1", lr=3e-4)


def train(path: str, epochs: int = 6) -> float:
    """Train the classifier on the generated sentences and save its state dict; returns test macro F1."""
    model = make_model().train()
    ids, mask, y = sentences(2048, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for (x, m), t in batches(ids, mask, y):
            loss = F.cross_entropy(model(x, m)["logits"], t)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    torch.save(model.state_dict(), path)
    with torch.no_grad():
        return make_task().evaluate(model)


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "text_model.pt"
    print(f"macro F1 on the test sentences: {train(out):.3f}; weights in {out}")
