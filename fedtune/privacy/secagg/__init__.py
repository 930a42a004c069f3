"""Secure aggregation (Bonawitz et al. 2017; SecAgg+ of Bell et al. 2020): the server learns only the sum.

`protocol` holds the client and server objects and their messages, `shamir` the t-of-n secret
sharing, `primitives` the key agreement, authenticated encryption and mask generator,
`quantize` the fixed-point encoding of float updates into Z_M.
"""
