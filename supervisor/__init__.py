"""hostvisor: a host supervisor for processes and Docker containers.

The import package is ``supervisor`` (the distribution and console script are
``hostvisor``). PyPI's ``supervisor`` (supervisord) installs the same import
package: never install both in one environment.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
