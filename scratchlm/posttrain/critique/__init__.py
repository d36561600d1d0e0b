"""Constitutional AI as a loop (Bai et al., 2022): generate, critique against principles, revise, train.

* :mod:`~scratchlm.posttrain.critique.principles`: the principles (parsed and checked from JSON),
  the programmatic checks, a critique and an evaluation;
* :mod:`~scratchlm.posttrain.critique.critics`: the critics a check may ask (the model, a scorer,
  a reward model) and the constitution that judges replies against every principle;
* :mod:`~scratchlm.posttrain.critique.loop`: the rounds (``critique_revise``), held-out compliance,
  and the run folder's claim and resume.
"""
