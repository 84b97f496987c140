"""Walking jaxprs in tests: every equation, those of sub-jaxprs included (remat, scan and kernel bodies)."""
from jax._src import core


def equations(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in core.jaxprs_in_params(eqn.params):
      yield from equations(sub)


def pallas_kernel_names(jaxpr):
  """The name of every pallas_call launch (jax 0.10 passes it as "name", later versions in name_and_src_info)."""
  names = []
  for eqn in equations(jaxpr):
    if eqn.primitive.name == "pallas_call":
      info = eqn.params.get("name_and_src_info")
      names.append(eqn.params["name"] if info is None else info.name)
  return names
