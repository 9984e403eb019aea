"""Independent reference computations with plain autograd (no Kronfluence, no if_query scoring code)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

MLP_SUFFIXES = (".mlp.c_fc", ".mlp.c_proj")


def reference_tokens(tokenizer, prompt: str, completion: str, max_length: int | None = None
                     ) -> tuple[list[int], list[int]]:
    """prompt ids + completion ids + EOS; only completion and EOS labelled. A tokenizer without BOS (GPT-2)
    needs a token before the first completion token to predict it: the prompt's last token, or EOS when the
    prompt is empty. ``max_length`` keeps the last prompt tokens that fit."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if max_length is not None:
        p = p[len(p) - min(len(p), max_length - len(c)):]
    if not p:
        p = [tokenizer.eos_token_id]
    return p + c, [-100] * len(p) + c


class Reference:
    def __init__(self, model_dir, layers=(0, 1)):
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
        self.params = []
        for name, module in self.model.named_modules():
            if name.endswith(MLP_SUFFIXES) and int(name.split(".")[2]) in layers:
                self.params += [module.weight, module.bias]

    def loss(self, record, labels_override=None, max_length=None) -> torch.Tensor:
        ids, labels = reference_tokens(self.tokenizer, record["prompt"], record["completion"], max_length)
        logits = self.model(torch.tensor([ids])).logits[0]
        target = torch.tensor(labels if labels_override is None else labels_override)
        return F.cross_entropy(logits[:-1], target[1:], ignore_index=-100, reduction="sum")

    def gradient(self, record, max_length=None) -> torch.Tensor:
        grads = torch.autograd.grad(self.loss(record, max_length=max_length), self.params)
        return torch.cat([g.flatten() for g in grads])

    def gradients(self, records, max_length=None) -> torch.Tensor:
        return torch.stack([self.gradient(r, max_length) for r in records])

    def mean_loss(self, record, max_length=None) -> float:
        """Summed loss / number of predicted labelled tokens (every completion token and EOS)."""
        ids, labels = reference_tokens(self.tokenizer, record["prompt"], record["completion"], max_length)
        with torch.no_grad():
            return float(self.loss(record, max_length=max_length)) / sum(label != -100 for label in labels[1:])


def per_position_contributions(reference: Reference, query, train) -> torch.Tensor:
    """Identity-strategy per-token scores of ``train`` for ``query``, position by position: with autograd
    hooks on the tracked modules, position s contributes sum over modules of a_s^T dW_q g_s + db_q . g_s, where
    a_s is the module's input at s, g_s the gradient of the train loss w.r.t. its output at s, and (dW_q, db_q)
    the query's loss gradient w.r.t. the module's weight and bias (GPT-2 Conv1D: y = x W + b)."""
    query_grads = torch.autograd.grad(reference.loss(query), reference.params)
    modules = [m for name, m in reference.model.named_modules() if name.endswith(MLP_SUFFIXES)
               and any(m.weight is p for p in reference.params)]
    captured: dict[int, list[torch.Tensor]] = {}

    def hook(index):
        def forward_hook(module, inputs, output):
            captured[index] = [inputs[0][0].detach()]
            output.register_hook(lambda grad: captured[index].append(grad[0].detach()))
        return forward_hook

    handles = [module.register_forward_hook(hook(i)) for i, module in enumerate(modules)]
    try:
        reference.loss(train).backward()
    finally:
        for handle in handles:
            handle.remove()
        reference.model.zero_grad(set_to_none=True)
    total = 0
    for i, _ in enumerate(modules):
        inputs, output_grads = captured[i]
        weight, bias = query_grads[2 * i], query_grads[2 * i + 1]
        total = total + torch.einsum("si,io,so->s", inputs, weight, output_grads) + output_grads @ bias
    return total
