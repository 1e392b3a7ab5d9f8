"""Fitting the mixture's weights (docs/fitting.md): the MaxMin mirror descent on implicit
rewards (``mirror_descent``, driven by ``driver``) and on reward functions
(``reward_fit``, driven by ``reward_driver``), and the reward functions themselves."""
