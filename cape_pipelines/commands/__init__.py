"""The ``cape`` command's groups, one module each; :mod:`cape_pipelines.cli` builds the parser.

Split from one 900-line module: :mod:`.common` holds what every command
shares, and :mod:`.policy`, :mod:`.reveal`, :mod:`.demo` and :mod:`.signals`
import only it, so the entry point (``cape_pipelines.cli:main``) stays the one
place that wires them together.
"""
