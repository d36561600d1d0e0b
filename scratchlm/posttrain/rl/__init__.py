"""Reinforcement learning on a language model: PPO and GRPO over one loop.

* :mod:`~scratchlm.posttrain.rl.losses`: the pure functions (token log-probabilities, GAE, group
  advantages, whitening, the clipped surrogate, KL estimators, entropy, masked mean);
* :mod:`~scratchlm.posttrain.rl.rollout`: sampled replies through the engine, the rollout and its loader;
* :mod:`~scratchlm.posttrain.rl.trainer`: the shared loop (roll out, score, advantages, clipped steps);
* :mod:`~scratchlm.posttrain.rl.ppo` and :mod:`~scratchlm.posttrain.rl.grpo`: the two methods.
"""
