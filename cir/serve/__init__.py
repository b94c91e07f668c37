"""`cir serve`: a trained model as an HTTP service with a web page (the command is in ``command.py``)."""
