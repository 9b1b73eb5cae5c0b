"""Which version is this plugin? `__version__`, the installed `rejoinder` distribution's (they ship together)."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rejoinder")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0"
