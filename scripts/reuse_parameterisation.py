#!/usr/bin/env python3
"""How well a token's earlier model output predicts its current one, along a dense generation, by what is reused.

    python scripts/reuse_parameterisation.py --model scenes --num-prompts 4     # CPU, about a minute

A pruned step reuses, for the tokens it does not compute, their velocity from the step that last computed them.
For a flow-matching model (x_t = (1 - s) x0 + s noise, output v = noise - x0) the same stale output could be reused
as its predicted clean image (x0 = x - s v, then v = (x_now - x0) / s_now) or its predicted noise (noise = x + (1 - s)
v, then v = (noise - x_now) / (1 - s_now)), or extrapolated to first order from the last two outputs. This runs one
dense generation, records every call's input, sigma and output, and prints, per gap g (steps since the output was
computed) and step, the relative error ||prediction - v|| / ||v|| of each rule against the true output.

Example:
    >>> rules = predictions(torch.ones(3, 1), torch.tensor([1.0, 0.8, 0.6]), torch.ones(3, 1), j=2, gap=1)
    >>> sorted(rules)
    ['clean image', 'extrapolate', 'noise', 'velocity']
"""

from __future__ import annotations

import argparse
import sys

import torch


def predictions(x: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor, j: int, gap: int) -> dict[str, torch.Tensor]:
    """The predictions of output ``j`` from output ``j - gap`` (and ``j - gap - 1``) under each reuse rule."""
    i = j - gap
    s_i, s_j = sigma[i], sigma[j]
    clean = x[i] - s_i * v[i]
    noise = x[i] + (1 - s_i) * v[i]
    out = {"velocity": v[i], "clean image": (x[j] - clean) / s_j, "noise": (noise - x[j]) / (1 - s_j)}
    if i >= 1:
        out["extrapolate"] = v[i] + (v[i] - v[i - 1]) * (s_j - s_i) / (s_i - sigma[i - 1])
    return out


def record(model: str, num_prompts: int, steps: int, guidance: float):
    """One dense generation: (inputs, sigmas, outputs) of every transformer call, stacked."""
    from catprune.evaluation.identity import held_out_captions
    from catprune.models import load_pipeline

    pipe = load_pipeline(model)
    calls = []
    forward = pipe.transformer.forward

    def recorded(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls.append((kwargs["hidden_states"].clone(), kwargs["timestep"].reshape(-1)[0] / 1000, out[0].clone()))
        return out

    pipe.transformer.forward = recorded
    prompts = held_out_captions()[:num_prompts]
    generator = torch.Generator().manual_seed(0)
    pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generator, output_type="pt")
    x, sigma, v = (torch.stack([c[k] for c in calls]) for k in range(3))
    return x.double(), sigma.double(), v.double()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="scenes", help="an embedded flow-matching model: scenes or shapes")
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=5.5)
    p.add_argument("--first", type=int, default=8, help="first step scored (the paper's start step)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    x, sigma, v = record(args.model, args.num_prompts, args.steps, args.guidance)
    last = len(sigma) - 1  # the last step's sigma is ~0: its relative errors say nothing (its step length is ~0)
    for gap in (1, 2, 3, 5):
        errors: dict[str, list[float]] = {}
        print(f"gap {gap}: step sigma | " + " | ".join(predictions(x, sigma, v, args.first, gap)))
        for j in range(max(args.first, gap + 1), last):
            rules = predictions(x, sigma, v, j, gap)
            row = {k: float((pred - v[j]).norm() / v[j].norm()) for k, pred in rules.items()}
            for k, e in row.items():
                errors.setdefault(k, []).append(e)
            print(f"  {j:3d} {float(sigma[j]):.3f} | " + " | ".join(f"{e:.3f}" for e in row.values()))
        print("  mean (steps before the last): " + ", ".join(f"{k} {sum(e) / len(e):.3f}" for k, e in errors.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
