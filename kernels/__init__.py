"""jaxlm's kernels (installed as `jaxlm.kernels`). Each kernel ships a pattern, a plain-jnp
reference, an XLA implementation, Pallas and Triton kernels, and a dispatcher."""
