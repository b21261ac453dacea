"""Online RL: sampling from the policy, scoring the samples and updating on them (GRPO, PPO, RLOO).

Modules are imported where they are used (``from jalign.rl import rewards``); this package imports nothing.
"""
