"""What the peer scripts record about the software they measured."""


def package_versions(*modules: str) -> dict:
  """{module: its __version__, or None when it is not installed or has no version}."""
  found = {}
  for module in modules:
    try:
      found[module] = __import__(module).__version__
    except (ImportError, AttributeError):
      found[module] = None
  return found
