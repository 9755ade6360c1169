"""SD1.x checkpoints → a model package (`npm run import`, `python3 -m trainer.importer`; docs/import.md).

    errors     ImportFailure: the one-line message of a refused import
    weight_files  tensor names and shapes from headers, tensors on request, content hashes
    inputs     single-file checkpoints and diffusers folders, opened lazily; what is not SD1.x is named
    naming     expert ids and titles from file names
    package    the import: checks, graphs (trainer.export's exporters), manifest, sources.json
    sources    sources.json: an imported expert's PyTorch weights loaded again from its original file
    miniature  tiny checkpoints in the real layouts, for tests
    afa_config an AFA training config for an imported package
    cli        the command line
"""
