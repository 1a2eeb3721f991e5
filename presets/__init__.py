"""The named presets, installed as the package `fmcli.presets` (pyproject.toml package-dir; read by fmcli.config).

A regular package, not a namespace one, because setuptools' editable-install finder can map only a package with an
__init__.py when it is nested inside another (fmcli).
"""
