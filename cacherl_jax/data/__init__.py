"""Training data: the thinking (knowledge-transfer) pipeline and the grain input pipeline.

The trajectory schema and its JSONL IO live one layer down, in `cacherl_jax.chat.trajectory`,
because the agent layer builds and reads trajectories too.
"""
