"""Methods: each module exposes ``METHOD`` (see :mod:`groundkit.engine`) and is listed in ``groundkit.cli.METHODS``."""
