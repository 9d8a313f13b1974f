"""Adapters that let training frameworks drive AgentOS. Each module imports its framework
lazily (only when used), so `import agentos` needs none of them:

- `agentos.integrations.trl`: the `rollout_func` of TRL's `GRPOTrainer`.
"""
