"""Kronecker-factored methods: the block layout of each tensor, factor statistics and
their roots or eigenbases, grafting, and the Shampoo and SOAP steps. Public names live in
`curvopt.transforms`."""
