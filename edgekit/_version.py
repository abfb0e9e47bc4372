"""The installed version of the edgekit-sdk distribution (a source tree without install: 0.0.0+local)."""

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "edgekit-sdk"
DEVICE_DISTRIBUTION = "edgekit-device-agent"

try:
    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+local"
