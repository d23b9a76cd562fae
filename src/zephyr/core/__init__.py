"""The base layer: typed configs built from recipes (`config`) and the errors a user can act on (`errors`)."""
