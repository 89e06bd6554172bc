"""The curated public API: every name in ``bpcp_jax.__all__`` resolves, and a star import gives them."""

import bpcp_jax as bp


def test_every_public_name_resolves():
  for name in bp.__all__:
    assert getattr(bp, name) is not None, name
  assert {"FamilyNetwork", "recalibrate_batch_stats", "trace_nnx", "create_model"} <= set(bp.__all__)
  namespace: dict = {}
  exec("from bpcp_jax import *", namespace)
  assert set(bp.__all__) <= set(namespace)
