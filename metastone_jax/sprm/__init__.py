"""The SPRM, the policy's own process reward model, in one place (docs/method.md sections 1-3, 5).

head.py: `SPRMHead`, the MLP that maps a penultimate-layer feature to one step logit.
steps.py: step tokens and the step rule (which token positions are scored, which feature scores
  them), shared by the training mask (`step_mask`) and the decode loop (sample/sampler.py).
aggregation.py: step scores -> candidate score (`aggregate`, `RunningScore`), best-of-K `select`.
loss.py: the SPR loss forms, gradient isolation and the correct-vs-incorrect score gap.
score_module.py: the released head file, `score_module.pt` / `.safetensors`, read and written.
"""
