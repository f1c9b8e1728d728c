"""Gauss-Newton methods: the model/loss split, EGN's direction, Hessian-free Newton-CG,
Levenberg-Marquardt damping and Armijo backtracking. Public names live in
`curvopt.transforms`."""
