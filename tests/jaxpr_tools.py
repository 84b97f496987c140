"""Walking jaxprs in tests: every equation, those of sub-jaxprs included (remat, scan and kernel bodies)."""

from jax._src import core

from lsm_jax.models.model import pallas_kernel_name


def equations(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in core.jaxprs_in_params(eqn.params):
      yield from equations(sub)


def pallas_kernel_names(jaxpr):
  """The name of every pallas_call launch."""
  return [pallas_kernel_name(eqn.params) for eqn in equations(jaxpr) if eqn.primitive.name == "pallas_call"]
