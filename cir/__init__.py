"""The ``cir`` command: the top layer, above datamodules, model code and callbacks."""
