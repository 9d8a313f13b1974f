"""A tiny GRPO loop: group rollouts -> advantages -> policy-gradient step -> update_weights.

The task: answer with lowercase vowels. The reward of a rollout is the fraction of its
tokens that are one of "aeiou". The policy starts as the random `tiny` model, so the
reward starts near chance (5 of 260 byte tokens) and rises as training goes on.

The trainer holds its own torch copy of the model and computes the logprobs of the
rollouts with a plain dense forward; the first iteration prints how far they are from the
logprobs the engine reported while sampling (the importance ratio is 1 when they agree).

    python examples/grpo_rollouts.py --iterations 8
    python examples/grpo_rollouts.py --url http://127.0.0.1:8000   # a running server

A server it updates the weights of must allow it: `agentos serve --allow-open-admin`, or
an admin key in AGENTOS_API_KEY.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import replace

import torch

from agentos import Client, Engine, SamplingParams
from agentos.kernel.runner.loader import load_model
from agentos.rl import RolloutWorker, Trajectory, group_advantages

VOWELS = set(b"aeiou")
PROMPTS = ["Say something: ", "Answer: ", "Q: what is in the box? A: ", "Sing: "]


def reward(t: Trajectory) -> float:
    # byte-level tokenizer: ids 0..255 are bytes (special tokens above)
    return sum(1 for i in t.response_ids if i in VOWELS) / max(1, len(t.response_ids))


def policy_loss(model, group: list[Trajectory]) -> tuple[torch.Tensor, float]:
    """GRPO's loss for one group (no clipping: one step per batch, on-policy), and the
    largest |trainer logprob - rollout logprob| seen (the two views of the same weights)."""
    advantages = group_advantages([t.reward for t in group])
    loss, drift, count = 0.0, 0.0, 0
    for t, adv in zip(group, advantages):
        ids = torch.tensor(t.prompt_ids + t.response_ids)
        logprobs = torch.log_softmax(model.dense_logits(ids), dim=-1)
        start = len(t.prompt_ids)
        lp = logprobs[start - 1 : -1].gather(1, ids[start:, None]).squeeze(1)
        mask = torch.tensor(t.response_mask, dtype=lp.dtype)
        rollout = torch.tensor(t.rollout_logprobs)
        drift = max(drift, float(((lp.detach() - rollout).abs() * mask).max()))
        ratio = torch.exp(lp - lp.detach())  # 1, with the gradient of lp
        loss = loss - (adv * ratio * mask).sum()
        count += int(mask.sum())
    return loss / max(1, count), drift


async def train(backend, iterations: int, group_size: int, max_tokens: int, lr: float,
                seed: int) -> list[float]:
    torch.manual_seed(seed)
    model, _, _ = load_model("tiny", "cpu", torch.float32)  # the trainer's copy of the weights
    model.requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    worker = RolloutWorker(backend)
    sampling = SamplingParams(max_tokens=max_tokens, temperature=1.0, ignore_eos=True)
    history = []
    for it in range(iterations):
        t0 = time.perf_counter()
        groups = await asyncio.gather(*(
            worker.generate_group(p, group_size, replace(sampling, seed=seed * 1000 + it * 10 + i),
                                  reward_fn=reward)
            for i, p in enumerate(PROMPTS)))
        rewards = [t.reward for g in groups for t in g]
        mean = sum(rewards) / len(rewards)
        history.append(mean)
        opt.zero_grad()
        drift = 0.0
        for g in groups:
            loss, d = policy_loss(model, g)
            (loss / len(groups)).backward()
            drift = max(drift, d)
        opt.step()
        version = await worker.update_weights(model.hf_named_tensors(), version=it + 1)
        print(f"iter {it}: mean reward {mean:.3f}  logprob drift {drift:.1e}  "
              f"weights v{version}  {time.perf_counter() - t0:.1f}s")
    return history


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="a running AgentOS server (default: an in-process engine)")
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    backend = Client(args.url) if args.url else Engine("tiny", kv_blocks=2048)
    try:
        history = asyncio.run(train(backend, args.iterations, args.group_size, args.max_tokens,
                                    args.lr, args.seed))
    finally:
        backend.close()
    k = max(1, len(history) // 4)
    first, last = sum(history[:k]) / k, sum(history[-k:]) / k
    print(f"mean reward: first {k} iterations {first:.3f} -> last {k} {last:.3f}")
    return 0 if last > first else 1


if __name__ == "__main__":
    sys.exit(main())
