"""The commands: ``llmscale a b`` is ``llmscale/jobs/a_b.py`` (``add_arguments(parser)``, ``main(args) -> int``).

Jobs parse arguments, call the library and print; the library returns values and logs. Jobs never import
each other (nor this package's face): what several of them share lives in the library.
"""
