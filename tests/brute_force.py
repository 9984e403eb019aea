"""Independent reference computations with plain autograd (no Kronfluence, no if_query scoring code)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

MLP_SUFFIXES = (".mlp.c_fc", ".mlp.c_proj")


def reference_tokens(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """prompt ids + completion ids + EOS; only completion and EOS labelled."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p + c, [-100] * len(p) + c


class Reference:
    def __init__(self, model_dir, layers=(0, 1)):
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
        self.params = []
        for name, module in self.model.named_modules():
            if name.endswith(MLP_SUFFIXES) and int(name.split(".")[2]) in layers:
                self.params += [module.weight, module.bias]

    def loss(self, record, labels_override=None) -> torch.Tensor:
        ids, labels = reference_tokens(self.tokenizer, record["prompt"], record["completion"])
        logits = self.model(torch.tensor([ids])).logits[0]
        target = torch.tensor(labels if labels_override is None else labels_override)
        return F.cross_entropy(logits[:-1], target[1:], ignore_index=-100, reduction="sum")

    def gradient(self, record) -> torch.Tensor:
        grads = torch.autograd.grad(self.loss(record), self.params)
        return torch.cat([g.flatten() for g in grads])

    def gradients(self, records) -> torch.Tensor:
        return torch.stack([self.gradient(r) for r in records])

    def mean_loss(self, record) -> float:
        ids, labels = reference_tokens(self.tokenizer, record["prompt"], record["completion"])
        with torch.no_grad():
            return float(self.loss(record)) / sum(label != -100 for label in labels)
