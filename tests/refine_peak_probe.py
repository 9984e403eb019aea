"""Measures --refine-steps' peak memory on the CPU, as a multiple of the tracked weights in float32 (run by
tests/test_refine.py in a subprocess of its own: the process's high-water mark is reset just before refining).

A random OLMo-2 whose MLPs dominate (hidden 384, MLP 6144, 2 blocks: 14.2 M tracked weights, 56.6 MB in float32),
random EK-FAC-shaped factors, one query, 2 steps on a batch of 2 x 16 tokens. Prints JSON: the growth of the
peak resident memory over what was resident before refining, and that divided by the tracked weights' bytes."""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, Olmo2Config

from if_query.kron.factors import Preconditioner
from if_query.plan.sizes import Shape
from if_query.score import refine


def resident_kb(field: str) -> int:
    for line in open("/proc/self/status", encoding="ascii"):
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(field)


def main() -> None:
    torch.manual_seed(0)
    config = Olmo2Config(num_hidden_layers=2, hidden_size=384, intermediate_size=6144, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=64, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config).eval()
    shapes = [Shape(f"model.layers.{k}.mlp.{name}", *((6144, 384) if name != "down_proj" else (384, 6144)), False)
              for k in range(2) for name in ("gate_proj", "up_proj", "down_proj")]
    inverse = refine.Inverse.__new__(refine.Inverse)
    inverse.pre = {}
    for s in shapes:
        q_a, _ = torch.linalg.qr(torch.randn(s.width, s.width))
        q_g, _ = torch.linalg.qr(torch.randn(s.out, s.out))
        inverse.pre[s.name] = Preconditioner(q_a, q_g, torch.rand(s.out, s.width) + 0.5, 0.1)
    inverse.damping = {s.name: 0.1 for s in shapes}
    ids = torch.randint(0, 64, (2, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    gradient = [{s.name: torch.randn(s.out, s.width) for s in shapes}]
    gauss_newton = refine.GaussNewton(model, shapes)
    with torch.enable_grad():
        gauss_newton.product(batch, gradient[0])  # warm: the first pass's one-off allocations are not refinement's
    before = resident_kb("VmRSS:")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")  # resets VmHWM to the current resident size
    with torch.enable_grad():
        refine.refine_queries(gauss_newton, inverse, gradient, [batch], int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    growth = (resident_kb("VmHWM:") - before) * 1024
    weights = sum(s.out * s.width for s in shapes) * 4
    print(json.dumps({"growth_bytes": growth, "tracked_bytes": weights, "multiple": growth / weights}))


if __name__ == "__main__":
    main()
