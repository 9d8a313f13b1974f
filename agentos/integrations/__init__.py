"""Adapters that let training frameworks drive AgentOS. Each module imports its framework
lazily (only when used), so `import agentos` needs none of them:

- `agentos.integrations.trl`: the `rollout_func` of TRL's `GRPOTrainer`.
- `agentos.integrations.verl`: verl's rollout backend `agentos` (loaded by verl itself,
  through its `verl.plugins` entry point).
"""
