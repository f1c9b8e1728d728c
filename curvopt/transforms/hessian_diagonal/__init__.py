"""Hessian-diagonal methods: the Hutchinson diagonal estimator as a transform, and the
AdaHessian and Sophia-H steps that consume it. Public names live in `curvopt.transforms`."""
