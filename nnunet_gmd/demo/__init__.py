"""The built-in demo: generated BraTS-like phantoms and the end-to-end pipeline run on them."""
