"""SD1.x checkpoints → a model package (`npm run import`, `python3 -m trainer.importer`; docs/import.md).

    errors     ImportFailure: the one-line message of a refused import
    inputs     single-file checkpoints and diffusers folders, opened lazily; what is not SD1.x is named
    naming     expert ids and titles from file names
    package    the import: checks, graphs (trainer.export's exporters), manifest, sources.json
    sources    sources.json: an imported expert's PyTorch weights loaded again from its original file
    miniature  tiny checkpoints in the real layouts, for tests
    cli        the command line
"""
