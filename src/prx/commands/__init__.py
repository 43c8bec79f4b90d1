"""The ``prx`` commands, one module each: ``prx.cli`` parses the command line (no heavy imports, so ``prx --help``
answers at once) and calls ``run(args)`` of the command's module, loaded only then."""
